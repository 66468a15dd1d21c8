"""The worker agent: one per machine. Heartbeats to the first healthy controller of its
list, runs the instances it declared (``--model``) plus those the controller assigns, and
reports their state.

Failover: each heartbeat has a timeout of one interval and, on failure, is retried on the
next controller of the list at once, so a dead controller costs at most one interval.
The agent keeps its instances running while no controller answers: an outage of the
control plane never stops inference."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from modelfleet import __version__
from modelfleet.auth import check_token
from modelfleet.config import DEFAULT_RUNNER_PORT_START, DEFAULT_WORKER_PORT, hostname, modelfleet_home
from modelfleet.errors import ApiError, install_error_handlers
from modelfleet.logs import valid_request_id
from modelfleet.metrics import (
    WORKER_CONTROLLER_SWITCHES,
    WORKER_HEARTBEATS,
    WORKER_INSTANCES,
    WORKER_REGISTERED,
    metrics_response,
)
from modelfleet.models import InstanceSpec, InstanceState, WorkerInfo
from modelfleet.sources import SourceError, canonical_source, is_remote, parse_source
from modelfleet.worker.downloads import DownloadManager, FetchFailed
from modelfleet.worker.modelspec import parse_model_flag
from modelfleet.worker.resources import collect_resources
from modelfleet.worker.slots import SlotScraper
from modelfleet.worker.supervisor import Supervisor

log = logging.getLogger("modelfleet.worker")


@dataclass
class WorkerSettings:
    controllers: list[str]
    join_token: str | None = None
    admin_token: str | None = None
    name: str = ""
    address: str = "127.0.0.1"  # what controllers and gateways use to reach this machine
    host: str = "0.0.0.0"  # where the agent and runners bind
    port: int = DEFAULT_WORKER_PORT
    heartbeat_interval: float = 2.0
    models: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    runner_port_start: int = DEFAULT_RUNNER_PORT_START
    startup_timeout: float = 600.0
    log_dir: Path | None = None
    models_dir: Path | None = None  # the model cache (remote sources), shared by workers on one machine
    # On SIGTERM: ready instances are reported draining (gateways stop sending them new
    # requests) and stopped once every gateway reports them idle, or after this long.
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{hostname()}-{self.port}"
        if self.log_dir is None:
            self.log_dir = modelfleet_home() / "logs" / self.name
        if self.models_dir is None:
            self.models_dir = modelfleet_home() / "models"


class PullIn(BaseModel):
    source: str = Field(min_length=1, max_length=2000)
    backend: str | None = Field(default=None, max_length=64)


class PruneIn(BaseModel):
    source: str | None = Field(default=None, max_length=2000)  # only this one; None: every unused one


def next_controller_index(current: int, count: int) -> int:
    """Round-robin over the controller list."""
    return (current + 1) % count if count else 0


class WorkerAgent:
    def __init__(self, settings: WorkerSettings) -> None:
        if not settings.controllers:
            raise ValueError("a worker needs at least one controller (--controller)")
        self.s = settings
        assert settings.log_dir is not None and settings.models_dir is not None
        self.downloads = DownloadManager(settings.models_dir, settings.log_dir)
        self.supervisor = Supervisor(
            bind_host=settings.host,
            advertise_host=settings.address,
            port_start=settings.runner_port_start,
            log_dir=settings.log_dir,
            startup_timeout=settings.startup_timeout,
            fetcher=self._fetch,
        )
        self.declared: list[InstanceSpec] = [parse_model_flag(m, settings.name) for m in settings.models]
        self.assigned: list[InstanceSpec] = []
        self.controller_index = 0
        self.registered = False
        self.last_ok: float | None = None
        self._sent_generation = -1  # last supervisor generation a controller accepted
        self._known_revision = -1
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(settings.heartbeat_interval))
        self._task: asyncio.Task[None] | None = None
        self.draining: set[str] | None = None  # instance ids drained before stopping (shutdown)
        self._drain_revision: int | None = None  # revision of the first heartbeat that said so
        self._last_reply: dict[str, Any] = {}
        self.slots = SlotScraper(timeout=min(1.5, settings.heartbeat_interval))

    @property
    def controller(self) -> str:
        return self.s.controllers[self.controller_index]

    async def _fetch(self, spec: InstanceSpec) -> str:
        path = await self.downloads.fetch(spec.source, spec.backend, spec.id)
        self.downloads.cache.touch(canonical_source(spec.source))
        return path

    def worker_info(self) -> WorkerInfo:
        resources = collect_resources(self.supervisor.held_resources())
        resources.cached_models = self.downloads.held()
        resources.downloads = self.downloads.progress()
        resources.disk_free = self.downloads.disk_free()
        resources.slots = list(self.slots.latest.values())
        return WorkerInfo(
            id=self.s.name, name=self.s.name, address=self.s.address, port=self.s.port,
            labels=self.s.labels, resources=resources, version=__version__,
        )

    def sources_in_use(self) -> set[str]:
        """Remote sources of the instances on this worker (pruning keeps them)."""
        return {canonical_source(st.source) for st in self.supervisor.statuses()
                if st.source and is_remote(st.source) and st.state != InstanceState.STOPPED}

    async def start(self) -> None:
        await self.supervisor.apply(self.declared)
        self._task = asyncio.create_task(self.heartbeat_loop())
        log.info("worker %s started: controllers %s, %d declared model(s)", self.s.name,
                 ",".join(self.s.controllers), len(self.declared))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # a drain that fails must not keep runners alive
            await self.drain()
        await self.supervisor.stop_all()
        await self.downloads.stop_all()
        await self._client.aclose()
        await self.slots.aclose()

    async def heartbeat_loop(self) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await self.slots.scrape(self.supervisor.slot_targets())
            with contextlib.suppress(Exception):
                await self.heartbeat_once()
            WORKER_INSTANCES.clear()
            for st in self.supervisor.statuses():
                WORKER_INSTANCES.labels(st.state.value).inc()
            await asyncio.sleep(max(0.05, self.s.heartbeat_interval - (time.monotonic() - started)))

    async def heartbeat_once(self) -> bool:
        """One heartbeat, trying each controller of the list once, starting at the current one."""
        for attempt in range(len(self.s.controllers)):
            if attempt:
                previous = self.controller
                self.controller_index = next_controller_index(self.controller_index, len(self.s.controllers))
                WORKER_CONTROLLER_SWITCHES.inc()
                log.info("worker %s: controller %s failed, switching to %s", self.s.name, previous, self.controller)
                # A new controller may sit on another store: report instances again.
                self._sent_generation = -1
            if await self._heartbeat_to(self.controller):
                return True
        self._set_registered(False, "no controller answered")
        return False

    def instance_report(self) -> list[dict[str, Any]]:
        declared = {spec.id for spec in self.declared}
        out = []
        for st in self.supervisor.statuses():
            update: dict[str, Any] = {"declared": st.id in declared}
            if self.draining is not None and st.id in self.draining:
                update["state"] = InstanceState.DRAINING  # routed no more (controller/routes.py)
            out.append(st.model_copy(update=update).model_dump())
        return out

    async def drain(self) -> None:
        """Before stopping (SIGTERM): take the ready instances out of rotation and wait until
        every gateway reports them idle (the controller answers from the load reports), at
        most ``drain_timeout``. Skipped when nothing is ready, and cut short when no
        controller answers (gateways cannot learn of it then) or no gateway reports at all
        (nobody routes here)."""
        ready = {st.id for st in self.supervisor.statuses() if st.state == InstanceState.READY}
        if not ready or not self.registered or self.s.drain_timeout <= 0:
            return
        self.draining = ready
        self._sent_generation = -1  # report the draining states now
        t0 = time.monotonic()
        log.info("worker %s: draining %d instance(s) before stopping (at most %.0f s)", self.s.name, len(ready),
                 self.s.drain_timeout)
        failures = 0
        outcome = f"drain timeout ({self.s.drain_timeout:.0f} s) reached"
        while time.monotonic() - t0 < self.s.drain_timeout:
            if not await self.heartbeat_once():
                failures += 1
                if failures >= 2:
                    outcome = "no controller answers"
                    break
            else:
                failures = 0
                reply = self._last_reply
                if self._drain_revision is not None:
                    if reply.get("gateways") == 0:
                        outcome = "no gateway reports load"
                        break
                    if ready <= set(reply.get("drained") or ()):
                        outcome = "idle at every gateway"
                        break
            await asyncio.sleep(min(0.5, self.s.heartbeat_interval))
        log.info("worker %s: drained after %.1f s (%s); stopping instances", self.s.name,
                 time.monotonic() - t0, outcome)

    async def _heartbeat_to(self, url: str) -> bool:
        generation = self.supervisor.generation
        send_statuses = generation != self._sent_generation
        body: dict[str, Any] = {
            "worker": self.worker_info().model_dump(),
            "instances": self.instance_report() if send_statuses else None,
            "known_revision": self._known_revision,
        }
        if self.draining is not None and self._drain_revision is not None:
            body["draining"] = sorted(self.draining)
            body["drain_revision"] = self._drain_revision
        headers = {"authorization": f"Bearer {self.s.join_token}"} if self.s.join_token else {}
        try:
            r = await self._client.post(f"{url}/v1/cluster/heartbeat", json=body, headers=headers)
        except httpx.HTTPError as exc:
            WORKER_HEARTBEATS.labels("unreachable").inc()
            log.debug("heartbeat to %s failed: %s", url, exc)
            return False
        if r.status_code == 403:
            WORKER_HEARTBEATS.labels("rejected").inc()
            if self.registered or self.last_ok is None:
                log.error("worker %s: controller %s rejected the join token", self.s.name, url)
            self._set_registered(False, "join token rejected")
            return False
        if r.status_code != 200:
            WORKER_HEARTBEATS.labels(f"http_{r.status_code}").inc()
            return False
        reply = r.json()
        self._last_reply = reply
        if self.draining is not None and send_statuses and self._drain_revision is None:
            # The statuses saying "draining" landed with this revision: gateways at it or past it
            # have the instances out of rotation.
            self._drain_revision = int(reply.get("revision", 0))
        WORKER_HEARTBEATS.labels("ok").inc()
        self.last_ok = time.monotonic()
        if reply.get("registered") and self.registered:
            log.info("worker %s: controller %s did not know this worker; registered again", self.s.name, url)
        self._set_registered(True, url)
        if send_statuses:
            self._sent_generation = generation
        if reply.get("registered") and not send_statuses:
            # The store forgot us (new store, GC): send the full instance report next beat.
            self._sent_generation = -1
        # Taken as is, even when lower: the controller only compares it for equality (a
        # different value sends the assignments), so a store whose revision went back (restored,
        # or accepted after it lost its state) never leaves this worker on stale assignments.
        self._known_revision = int(reply.get("revision", -1))
        if reply.get("assignments") is not None and self.draining is None:
            self.assigned = [InstanceSpec.model_validate(a) for a in reply["assignments"]]
            await self.supervisor.apply(self.declared + self.assigned)
        return True

    def _set_registered(self, value: bool, detail: str) -> None:
        if value != self.registered:
            log.info("worker %s: %s", self.s.name,
                     f"registered with controller {detail}" if value else f"not registered: {detail}")
        self.registered = value
        WORKER_REGISTERED.set(1 if value else 0)


def create_app(settings: WorkerSettings) -> FastAPI:
    agent = WorkerAgent(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await agent.start()
        try:
            yield
        finally:
            await agent.stop()

    app = FastAPI(title="modelfleet worker", version=__version__, lifespan=lifespan)
    app.state.agent = agent
    install_error_handlers(app)

    def cluster_auth(request: Request) -> None:
        check_token(request, [settings.join_token, settings.admin_token], what="join or admin token")

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True, "worker": settings.name}

    @app.get("/health/ready")
    async def ready(response: Response) -> dict[str, Any]:
        if not agent.registered:
            response.status_code = 503
        return {"ready": agent.registered, "controller": agent.controller, "worker": settings.name}

    @app.get("/metrics", response_class=PlainTextResponse)  # Prometheus text, as documented
    async def metrics() -> Response:
        return metrics_response()

    @app.get("/v1/instances")
    async def instances(request: Request) -> dict[str, Any]:
        cluster_auth(request)
        return {"data": [st.model_dump() for st in agent.supervisor.statuses()]}

    @app.get("/v1/instances/{instance_id:path}/logs")
    async def logs(instance_id: str, request: Request, lines: int = Query(100, ge=1, le=5000),
                   request_id: str | None = Query(None, alias="request")) -> dict[str, Any]:
        cluster_auth(request)
        if instance_id not in {st.id for st in agent.supervisor.statuses()}:
            raise ApiError(404, f"instance {instance_id} is not on worker {settings.name}")
        if request_id is not None and valid_request_id(request_id) is None:
            raise ApiError(400, "not a request id (at most 128 of A-Z a-z 0-9 . _ : / + = @ -)", param="request")
        return {"id": instance_id, "worker": settings.name,
                "lines": agent.supervisor.logs(instance_id, lines, request_id)}

    # -- the model cache: `modelfleet models pull` and `modelfleet cache`, through the controller
    @app.post("/v1/models/pull", status_code=202)
    async def pull(body: PullIn, request: Request) -> dict[str, Any]:
        cluster_auth(request)
        try:
            if parse_source(body.source) is None:
                raise ApiError(400, f"{body.source!r} is not a remote source (hf://, modelscope://, https://)",
                               param="source")
            d = agent.downloads.pull(body.source, body.backend)
        except (SourceError, FetchFailed) as exc:
            raise ApiError(400, str(exc), param="source") from None
        return {"worker": settings.name, "download": d.view().model_dump()}

    @app.get("/v1/models/downloads")
    async def downloads(request: Request) -> dict[str, Any]:
        cluster_auth(request)
        return {"worker": settings.name, "data": [d.model_dump() for d in agent.downloads.recent()]}

    @app.get("/v1/models/cache")
    async def cache(request: Request) -> dict[str, Any]:
        cluster_auth(request)
        entries = await asyncio.to_thread(agent.downloads.entries, agent.sources_in_use())
        return {"worker": settings.name, "dir": str(settings.models_dir), "disk_free": agent.downloads.disk_free(),
                "data": entries, "downloads": [d.model_dump() for d in agent.downloads.progress()]}

    @app.post("/v1/models/cache/prune")
    async def prune(body: PruneIn, request: Request) -> dict[str, Any]:
        cluster_auth(request)
        only = canonical_source(body.source) if body.source else None
        in_use = agent.sources_in_use()
        if only is not None and only in in_use:
            raise ApiError(409, f"{only} is in use by an instance on worker {settings.name}; undeploy it first")
        result = await agent.downloads.prune(in_use, only)
        return {"worker": settings.name, **result}

    return app


def run_worker(settings: WorkerSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                access_log=False, log_config=None)  # logs go through logs.py
