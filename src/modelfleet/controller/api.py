"""The controller: cluster state over HTTP, backed by a Store.

Every controller serves reads and writes; the lease holder also runs the singleton loops.
Routes for gateways are long-polled (``GET /v1/cluster/routes?since=REV&wait=S``); a
watcher on every controller bumps the routing revision when the set of alive workers
changes, because liveness is computed on read and so changes without any write.

Each controller remembers the cluster identity its store showed first. A store that later
shows none or another (it lost its state) is refused: not ready, no heartbeats, no route
tables, no singleton loops, until an operator accepts it (``POST /v1/cluster/store/accept``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfleet import __version__
from modelfleet.auth import check_authorization, check_token, new_api_key
from modelfleet.catalog import load_catalog
from modelfleet.config import DEFAULT_CONTROLLER_PORT, default_store_url, hostname
from modelfleet.controller.autoscaler import Autoscaler, autoscaled_start, model_loads
from modelfleet.controller.lease import LEADER_LEASE, LeaderElector
from modelfleet.controller.models_api import attach_downloads, call_worker, models_router, prepare_deployment
from modelfleet.controller.reconciler import Reconciler, drained_idle
from modelfleet.controller.routes import build_route_table
from modelfleet.errors import ApiError, error_body, install_error_handlers, validation_error
from modelfleet.health import alive_worker_ids, is_alive, worker_ttl
from modelfleet.logs import valid_request_id
from modelfleet.metrics import (
    CONTROLLER_GC_DELETED,
    CONTROLLER_HEARTBEAT_SECONDS,
    CONTROLLER_HEARTBEATS,
    CONTROLLER_INSTANCE_EVENTS,
    CONTROLLER_OUTAGE_FORGIVEN,
    CONTROLLER_REVISION,
    CONTROLLER_ROUTE_WAITERS,
    CONTROLLER_STORE_LOST,
    CONTROLLER_STORE_UP,
    CONTROLLER_WORKERS,
    metrics_response,
)
from modelfleet.models import (
    ApiKey,
    AutoscalePolicy,
    Concurrency,
    Deployment,
    DeploymentSpec,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    LoadReport,
    Params,
    PlacementSpec,
    Replicas,
    Routing,
    SafeStr,
    Weight,
    WorkerInfo,
)
from modelfleet.store import Store, StoreConfigError, StoreError, StoreUnavailable, describe_url, open_store
from modelfleet.store.base import AUTH_REQUIRED, ClusterMeta, Persistence

# Revisions gateways may report (``seen``): exact in a JSON number, far above time in ms.
MAX_REVISION = 2**53

log = logging.getLogger("modelfleet.controller")


@dataclass
class ControllerSettings:
    store_url: str = field(default_factory=default_store_url)
    host: str = "0.0.0.0"
    port: int = DEFAULT_CONTROLLER_PORT
    admin_token: str | None = None
    join_token: str | None = None
    heartbeat_interval: float = 2.0
    missed_heartbeats: int = 3
    lease_ttl: float = 10.0
    # Workers dead this long are deleted by the leader (their rows only; deployments stay).
    gc_dead_after: float = 24 * 3600.0
    # Replicas of a worker dead longer than this are moved (reconciler, leader only).
    reschedule_grace: float = 30.0
    moves_per_minute: int = 10
    # A drained replica is stopped this long after it stopped getting new requests.
    drain_timeout: float = 30.0
    # Gateways report their load every second; a report counts this long (store clock), so
    # a gateway that dies stops counting within it.
    load_report_ttl: float = 5.0
    controller_id: str = ""
    catalog: str | None = None  # an operator's catalog file, added to the built-in one
    source_lookup_timeout: float = 5.0  # asking a hub for a new deployment's model size
    # Run on a Redis that keeps nothing across its restart (no RDB, no AOF); see run_controller.
    allow_volatile_store: bool = False

    def __post_init__(self) -> None:
        if not self.controller_id:
            self.controller_id = f"{hostname()}:{self.port}:{uuid.uuid4().hex[:6]}"

    @property
    def worker_ttl(self) -> float:
        return worker_ttl(self.heartbeat_interval, self.missed_heartbeats)


class HeartbeatIn(BaseModel):
    worker: WorkerInfo
    # None when nothing changed since the worker's last accepted report: a one-write heartbeat.
    instances: list[InstanceStatus] | None = None
    # The routing revision the worker last saw; assignments are re-read only when it moved.
    known_revision: int = -1
    # A worker shutting down: the instances it drains, and the revision at which it reported
    # them draining; the reply says which are idle at every gateway (load reports).
    draining: list[str] | None = Field(default=None, max_length=10_000)
    drain_revision: int = -1


class DeploymentPatch(BaseModel):
    """The same limits as a new deployment (DeploymentSpec); an unknown field is a 422, not ignored."""

    model_config = ConfigDict(extra="forbid")

    replicas: Replicas | None = None
    max_concurrency: Concurrency | None = None
    weight: Weight | None = None
    params: Params | None = None
    placement: PlacementSpec | None = None
    routing: Routing | None = None
    # A policy turns autoscaling on (replicas are then the autoscaler's); null turns it off.
    autoscale: AutoscalePolicy | None = None


class InstanceEventIn(BaseModel):
    event: str = Field(pattern="^(ejected|restored)$")
    reason: str = ""
    gateway: str = ""


class KeyIn(BaseModel):
    name: SafeStr = Field(min_length=1, max_length=128)


class RevisionWatcher:
    """One store poll shared by every long-polling gateway on this controller."""

    def __init__(self, store: Store, poll_interval: float = 0.2) -> None:
        self.store, self.poll_interval = store, poll_interval
        self.revision = -1
        self._changed = asyncio.Condition()
        # Set when the store shows a lower revision than this controller served (restored
        # from an older copy): wakes the readiness loop at once, before the store's ordinary
        # writes climb back to numbers that readers already hold with other contents.
        self.went_back = asyncio.Event()
        # The highest revision this controller told anyone: heartbeat replies carry the
        # store's revision of the moment, which can be ahead of the last poll.
        self.handed_out = -1

    @property
    def served(self) -> int:
        return max(self.revision, self.handed_out)

    def hand_out(self, rev: int) -> int:
        if rev > self.handed_out:
            self.handed_out = rev
        return rev

    async def run(self) -> None:
        while True:
            try:
                rev = await self.store.get_revision()
                # Only forward: a store whose revision went back is the readiness loop's to
                # fix (Controller.check_store), after it has checked the store's identity.
                if rev > self.revision:
                    self.revision = rev
                    CONTROLLER_REVISION.set(rev)
                    async with self._changed:
                        self._changed.notify_all()
                if rev < self.served:
                    self.went_back.set()
            except StoreError:
                pass  # readiness reports the outage; gateways keep their table
            await asyncio.sleep(self.poll_interval)

    async def wait_past(self, since: int, wait: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.revision > since), wait)
                return True
            except TimeoutError:
                return False


class AssignmentCache:
    """Every worker's assigned instances, read once per routing revision, not once per heartbeat.

    During a mass registration the revision moves with every new worker; re-reading one
    worker's instances on each heartbeat would make the cost grow with the square of the
    cluster. One full read per revision, shared by all heartbeats, keeps it flat."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.revision = -1
        self.by_worker: dict[str, list[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()

    def reset(self) -> None:
        """Forget what was read: the store's revision went back (restored, or another store),
        so "not newer than what I hold" no longer means "nothing changed"."""
        self.revision = -1
        self.by_worker = {}

    async def for_worker(self, worker_id: str, at_least: int) -> list[dict[str, Any]]:
        if self.revision < at_least:
            async with self._lock:
                if self.revision < at_least:
                    # Read the revision first: the instances read after it are at least that new.
                    revision = await self.store.get_revision()
                    by_worker: dict[str, list[dict[str, Any]]] = {}
                    for i in await self.store.list_instances():
                        if i.deployment is not None and i.worker_id is not None:
                            spec = InstanceSpec.model_validate(i.model_dump()).model_dump()
                            by_worker.setdefault(i.worker_id, []).append(spec)
                    self.by_worker, self.revision = by_worker, max(revision, at_least)
        return self.by_worker.get(worker_id, [])


class Controller:
    """State and background loops of one controller process."""

    def __init__(self, settings: ControllerSettings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.store_url)
        self.ready = False
        self.not_ready_reason = "starting"
        # The identity the store showed first (see the module docstring), and whether that
        # cluster required API keys when last seen (carried over when an operator accepts a
        # store that lost its state).
        self.cluster_id: str | None = None
        self.auth_required = False
        self.lost_state: str | None = None  # why the store is refused, while it is
        self._identity_lock = asyncio.Lock()  # one readiness pass or accept at a time
        self.revisions = RevisionWatcher(self.store)
        self.assignments = AssignmentCache(self.store)
        self.reconciler = Reconciler(
            self.store, ttl=settings.worker_ttl, grace=settings.reschedule_grace,
            moves_per_minute=settings.moves_per_minute, drain_timeout=settings.drain_timeout,
        )
        self.autoscaler = Autoscaler(self.store)
        self.elector = LeaderElector(
            self.store, settings.controller_id, settings.lease_ttl,
            [self.gc_loop, self.reconciler.run, self.autoscaler.run],
            can_lead=lambda: self.ready,
        )
        self._alive: set[str] | None = None
        # Alive workers as the cached route table saw them: if liveness moved since (e.g. the
        # table was built during an outage, before workers came back), the revision must move.
        self._table_alive: set[str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._route_cache: tuple[int, dict[str, Any]] | None = None

    async def start(self) -> None:
        await self.store.migrate()
        meta = await self.store.get_cluster_meta()
        self.cluster_id, self.auth_required = meta.cluster_id, meta.auth == AUTH_REQUIRED
        # No controller took heartbeats for this one until now: if none did (every controller
        # was down), that time must not count against the workers either.
        await self._regained_store()
        await self._set_ready(True, "")
        self._tasks = [
            asyncio.create_task(self.revisions.run()),
            asyncio.create_task(self.readiness_loop()),
            asyncio.create_task(self.health_watch_loop()),
            asyncio.create_task(self.elector.run()),
        ]
        log.info("controller %s serving, store %s, cluster %s", self.settings.controller_id,
                 describe_url(self.settings.store_url), self.cluster_id)

    async def stop(self) -> None:
        for t in reversed(self._tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.store.close()

    async def _set_ready(self, ready: bool, reason: str) -> None:
        if ready != self.ready:
            log.info("controller %s: store %s", "ready" if ready else "NOT ready",
                     "reachable" if ready else f"refused: {reason}" if self.lost_state else f"unavailable: {reason}")
        self.ready, self.not_ready_reason = ready, reason
        CONTROLLER_STORE_UP.set(1 if ready else 0)

    async def readiness_loop(self) -> None:
        """Ready = the store answers, is migrated and shows this controller's cluster identity."""
        while True:
            try:
                await self.check_store()
            except (StoreError, OSError) as exc:
                await self._set_ready(False, str(exc) or type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.revisions.went_back.wait(), 1.0)
            self.revisions.went_back.clear()

    async def check_store(self) -> None:
        """One readiness pass. The identity comes first: a store that lost its state is never
        migrated (re-initialized) here, only when an operator accepts it."""
        async with self._identity_lock:
            await self._check_store()

    async def _check_store(self) -> None:
        meta = await self.store.get_cluster_meta()
        if meta.cluster_id != self.cluster_id:
            if self.cluster_id is not None and self.cluster_id in meta.replaces and meta.cluster_id:
                self._adopt(meta, "accepted by an operator through another controller")
            else:
                await self._refuse(meta)
                return
        if not self.ready:
            await self.store.migrate()  # same identity: schema upgrades only
            await self.store.ping()
            await self._regained_store()
        else:
            await self.store.ping()
        self.auth_required = meta.auth == AUTH_REQUIRED
        await self._keep_revision_forward()
        await self._set_ready(True, "")

    async def _regained_store(self) -> None:
        """Before taking heartbeats again: the time no heartbeat landed does not count."""
        forgiven = await self.store.record_outage()
        CONTROLLER_OUTAGE_FORGIVEN.inc(forgiven)
        if forgiven >= self.settings.heartbeat_interval:
            log.info("the store took no heartbeat for %.1f s (store or controllers unreachable): that time does "
                     "not count against workers", forgiven)

    async def _keep_revision_forward(self) -> None:
        """A store restored from an older copy shows a lower revision than the one this
        controller served: move it past, so no reader ever sees the revision go back."""
        served = self.revisions.served
        if served < 0 or await self.store.get_revision() >= served:
            return
        now = await self.store.advance_revision(served + 1)
        self.assignments.reset()
        log.warning("the store's routing revision went back below %d (restored from an older copy?): "
                    "advanced to %d", served, now)

    async def _refuse(self, meta: ClusterMeta) -> None:
        shows = "no cluster identity" if meta.cluster_id is None else f"cluster {meta.cluster_id}"
        reason = (f"the store shows {shows}, this controller serves cluster {self.cluster_id}: the store lost its "
                  "state (or is another cluster's); refusing it until an operator accepts it "
                  "(modelfleet store accept)")
        if reason != self.lost_state:
            log.error("STORE STATE LOST: %s", reason)
        self.lost_state = reason
        CONTROLLER_STORE_LOST.set(1)
        await self._set_ready(False, reason)

    def _adopt(self, meta: ClusterMeta, why: str) -> None:
        log.warning("cluster identity %s -> %s: %s", self.cluster_id, meta.cluster_id, why)
        self.cluster_id, self.lost_state = meta.cluster_id, None
        CONTROLLER_STORE_LOST.set(0)
        # Everything read from the old store is void; the revision starts over from the new one.
        self.revisions.revision = -1
        self.assignments.reset()
        self._route_cache, self._alive, self._table_alive = None, None, None

    async def accept_store(self, replaces: str | None = None) -> dict[str, Any]:
        """An operator accepts the store as it is now (it lost its state): create its schema and
        identity if it has none, record which cluster it replaces (gateways that remember that
        one take its tables) and that keys were required, if they were.

        ``replaces``: for a controller that does not know the lost cluster (restarted since),
        the id gateways still remember (their log names it)."""
        async with self._identity_lock:
            return await self._accept_store(replaces)

    async def _accept_store(self, replaces: str | None) -> dict[str, Any]:
        if self.lost_state is None:
            if replaces and replaces != self.cluster_id:
                await self.store.record_accepted(replaces, auth_required=False)
                meta = await self.store.get_cluster_meta()
                log.warning("cluster %s declared by an operator to replace cluster %s", self.cluster_id, replaces)
                return {"accepted": True, "cluster_id": self.cluster_id, "replaces": list(meta.replaces),
                        "auth": meta.auth}
            return {"accepted": False, "cluster_id": self.cluster_id, "reason": "the store shows this cluster"}
        old = self.cluster_id
        await self.store.migrate()
        assert old is not None
        await self.store.record_accepted(old, self.auth_required)
        meta = await self.store.get_cluster_meta()
        self._adopt(meta, "accepted by an operator" + (", API keys still required" if self.auth_required else ""))
        await self._set_ready(False, "store accepted; checking it")
        return {"accepted": True, "cluster_id": meta.cluster_id, "replaces": list(meta.replaces),
                "auth": meta.auth}

    async def health_watch_loop(self) -> None:
        """Liveness changes without a write; bump the revision so gateways re-read routes."""
        interval = max(0.25, self.settings.heartbeat_interval / 2)
        while True:
            await asyncio.sleep(interval)
            if not self.ready:
                continue  # an outage not yet recorded (record_outage) would read every worker as dead
            try:
                workers = await self.store.list_workers()
            except StoreError:
                continue
            alive = alive_worker_ids(workers, self.settings.worker_ttl)
            CONTROLLER_WORKERS.labels("alive").set(len(alive))
            CONTROLLER_WORKERS.labels("dead").set(len(workers) - len(alive))
            if self._alive is not None and alive != self._alive:
                for wid in sorted(self._alive - alive):
                    log.info("worker %s is dead (no heartbeat for %.1f s)", wid, self.settings.worker_ttl)
                for wid in sorted(alive - self._alive):
                    log.info("worker %s is alive", wid)
            stale_table = self._table_alive is not None and alive != self._table_alive
            if (self._alive is not None and alive != self._alive) or stale_table:
                with contextlib.suppress(StoreError):
                    await self.store.bump_revision()
                    self._table_alive = None  # the next table is built from fresh liveness
            self._alive = alive

    async def gc_loop(self, token: int) -> None:
        """Leader only: delete workers dead for a long time (their declared instances go too)."""
        while True:
            try:
                deleted = await self.store.delete_dead_workers(self.settings.gc_dead_after)
            except StoreError:
                deleted = []
            for wid in deleted:
                CONTROLLER_GC_DELETED.inc()
                log.info("worker %s deleted after %.0f s dead (leader token %d)",
                         wid, self.settings.gc_dead_after, token)
            await asyncio.sleep(max(5.0, min(60.0, self.settings.gc_dead_after / 10)))

    async def route_table(self, revision: int) -> dict[str, Any]:
        if self._route_cache and self._route_cache[0] == revision:
            return self._route_cache[1]
        workers, instances, deployments, keys, now, meta = await asyncio.gather(
            self.store.list_workers(), self.store.list_instances(), self.store.list_deployments(),
            self.store.list_api_keys(), self.store.now(), self.store.get_cluster_meta(),
        )
        if meta.cluster_id != self.cluster_id:
            # Lost its state since the last readiness pass: never publish what is left of it.
            raise StoreUnavailable(f"the store shows cluster {meta.cluster_id}, not {self.cluster_id}")
        alive = alive_worker_ids(workers, self.settings.worker_ttl)
        table = build_route_table(
            revision=revision, store_time=now, controller_id=self.settings.controller_id,
            ttl=self.settings.worker_ttl, alive=alive, instances=instances,
            deployments=deployments, api_keys=keys, meta=meta,
        )
        self._route_cache = (revision, table)
        self._table_alive = alive
        return table


class HeartbeatEndpoint:
    """``POST /v1/cluster/heartbeat`` as a bare ASGI app in front of FastAPI.

    The hottest call of the control plane (every worker, every interval). FastAPI's routing,
    middleware stack and generic body/response encoding cost more CPU than the store write
    itself, so this path validates straight from bytes and answers with orjson; every other
    path goes on to the FastAPI app. Errors keep the OpenAI error body."""

    PATH = "/v1/cluster/heartbeat"

    def __init__(self, ctl: Controller, app: Any) -> None:
        self.ctl, self.app = ctl, app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        try:
            status, payload = 200, await self.handle(b"".join(chunks), auth.decode("latin-1"))
        except ApiError as err:
            status, payload = err.status, error_body(err.status, err.message, param=err.param, code=err.code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(payload)})

    async def handle(self, raw: bytes, authorization: str) -> dict[str, Any]:
        ctl, s = self.ctl, self.ctl.settings
        check_authorization(authorization, [s.join_token], what="join token", missing_status=403)
        t0 = time.perf_counter()
        try:
            # Strict: a worker sends exact types (``false`` is no revision or pid; lax pydantic
            # would read it as 0: found by schemathesis).
            body = HeartbeatIn.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        if not ctl.ready:
            CONTROLLER_HEARTBEATS.labels("store_down").inc()
            raise ApiError(503, f"store unavailable: {ctl.not_ready_reason}", code="store_unavailable")
        try:
            result = await ctl.store.heartbeat(body.worker, body.instances)
            assignments = None
            if result.registered or result.revision != body.known_revision or body.instances is not None:
                assignments = await ctl.assignments.for_worker(body.worker.id, result.revision)
        except StoreError as exc:
            CONTROLLER_HEARTBEATS.labels("store_down").inc()
            raise _store_call_error(exc) from exc
        if result.registered:
            log.info("worker %s registered (%s:%d)", body.worker.id, body.worker.address, body.worker.port)
        CONTROLLER_HEARTBEATS.labels("ok").inc()
        CONTROLLER_HEARTBEAT_SECONDS.observe(time.perf_counter() - t0)
        reply: dict[str, Any] = {
            "registered": result.registered,
            "revision": ctl.revisions.hand_out(result.revision),
            "assignments": assignments,
            "heartbeat_interval": s.heartbeat_interval,
            "controller_id": s.controller_id,
        }
        if body.draining is not None:
            try:
                reports = await ctl.store.list_load_reports()
            except StoreError as exc:
                raise _store_call_error(exc) from exc
            reply["gateways"] = len(reports)
            reply["drained"] = [i for i in body.draining if drained_idle(i, reports, body.drain_revision)]
        return reply


def _store_call_error(exc: Exception) -> ApiError:
    """An outage is a 503 (clients may try another controller); any other store error is not
    an outage and another controller would fail the same way: 500, so clients stop there."""
    if isinstance(exc, StoreUnavailable | StoreConfigError):
        return ApiError(503, f"store unavailable: {exc or type(exc).__name__}", code="store_unavailable")
    return ApiError(500, f"the store refused the operation: {exc or type(exc).__name__}", code="store_error")


class RejectNul:
    """400 for a path or query string that carries a NUL character (``%00``): no store can
    compare with it (PostgreSQL refuses it outright), and a client's bad id must be a 4xx."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope["query_string"]):
            data = orjson.dumps(error_body(400, "NUL characters are not allowed in paths or query strings",
                                           code="invalid_request"))
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": data})
            return
        await self.app(scope, receive, send)


def create_app(settings: ControllerSettings, store: Store | None = None) -> HeartbeatEndpoint:
    """The controller's ASGI app: the heartbeat fast path in front of the FastAPI app."""
    ctl = Controller(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctl.start()
        try:
            yield
        finally:
            await ctl.stop()

    app = FastAPI(title="modelfleet controller", version=__version__, lifespan=lifespan)
    app.state.controller = ctl
    install_error_handlers(app)
    s = settings
    catalog = load_catalog(s.catalog)

    def admin(request: Request) -> None:
        check_token(request, [s.admin_token], what="admin token")

    def cluster_read(request: Request) -> None:
        # Reads of cluster state: the admin token, or the join token (gateways and workers).
        check_token(request, [s.admin_token, s.join_token] if s.admin_token else [], what="admin token")

    def join(request: Request) -> None:
        check_token(request, [s.join_token], what="join token", missing_status=403)

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> Response:
        err = _store_call_error(exc)
        from modelfleet.errors import error_response

        return error_response(err.status, err.message, code=err.code)

    @app.post("/v1/cluster/heartbeat")
    async def heartbeat(body: HeartbeatIn) -> dict[str, Any]:
        """A worker's heartbeat, with the join token. Served by HeartbeatEndpoint in front of this
        app, so a call never reaches here: declared for the OpenAPI document (and its fuzzers)."""
        raise ApiError(500, "heartbeats are served in front of the API app")

    # -- health & metrics ---------------------------------------------------------------
    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True, "controller_id": s.controller_id}

    @app.get("/health/ready")
    async def ready(response: Response) -> dict[str, Any]:
        if not ctl.ready:
            response.status_code = 503
        return {"ready": ctl.ready, "reason": ctl.not_ready_reason or None, "controller_id": s.controller_id,
                "leader": ctl.elector.is_leader, "store": describe_url(s.store_url), "cluster_id": ctl.cluster_id,
                "store_state_lost": ctl.lost_state is not None}

    @app.get("/metrics", response_class=PlainTextResponse)  # Prometheus text, as documented
    async def metrics() -> Response:
        return metrics_response()

    # -- workers ------------------------------------------------------------------------

    def worker_view(w: Any, instance_count: int) -> dict[str, Any]:
        d = w.model_dump()
        d["alive"] = is_alive(w.heartbeat_age, s.worker_ttl)
        d["instances"] = instance_count
        return d

    @app.get("/v1/cluster/workers")
    async def list_workers(request: Request) -> dict[str, Any]:
        cluster_read(request)
        workers, instances = await asyncio.gather(ctl.store.list_workers(), ctl.store.list_instances())
        counts: dict[str | None, int] = {}
        for i in instances:
            counts[i.worker_id] = counts.get(i.worker_id, 0) + 1
        return {"data": [worker_view(w, counts.get(w.id, 0)) for w in workers], "ttl": s.worker_ttl}

    @app.get("/v1/cluster/workers/{worker_id}")
    async def get_worker(worker_id: str, request: Request) -> dict[str, Any]:
        cluster_read(request)
        w = await ctl.store.get_worker(worker_id)
        if w is None:
            raise ApiError(404, f"worker {worker_id} not found")
        return worker_view(w, len(await ctl.store.list_instances(worker_id=worker_id)))

    @app.delete("/v1/cluster/workers/{worker_id}", status_code=204)
    async def delete_worker(worker_id: str, request: Request) -> Response:
        admin(request)
        if not await ctl.store.delete_worker(worker_id):
            raise ApiError(404, f"worker {worker_id} not found")
        return Response(status_code=204)

    # -- instances ----------------------------------------------------------------------
    def instance_view(i: Any, worker_alive: bool | None) -> dict[str, Any]:
        d = i.model_dump()
        if not i.enabled and i.state in (InstanceState.READY, InstanceState.STARTING):
            d["state"] = InstanceState.DRAINING.value  # disabled: in-flight requests finish, no new ones
        d["worker_alive"] = worker_alive
        return d

    async def instance_views(worker_id: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        workers, instances = await asyncio.gather(
            ctl.store.list_workers(), ctl.store.list_instances(worker_id=worker_id, model=model)
        )
        alive = alive_worker_ids(workers, s.worker_ttl)
        views = [instance_view(i, i.worker_id in alive if i.worker_id else None) for i in instances]
        attach_downloads(views, workers)
        return views

    @app.get("/v1/cluster/instances")
    async def list_instances(request: Request, worker: str | None = None, model: str | None = None
                             ) -> dict[str, Any]:
        cluster_read(request)
        return {"data": await instance_views(worker, model)}

    @app.get("/v1/cluster/instances/{instance_id:path}/logs")
    async def instance_logs(instance_id: str, request: Request, lines: int = Query(100, ge=1, le=5000),
                            request_id: str | None = Query(None, alias="request")) -> dict[str, Any]:
        """Runner logs live on the worker's disk; fetch them from its agent (``request``: only
        the lines naming that request id)."""
        cluster_read(request)
        if request_id is not None and valid_request_id(request_id) is None:
            raise ApiError(400, "not a request id (at most 128 of A-Z a-z 0-9 . _ : / + = @ -)", param="request")
        inst = await ctl.store.get_instance(instance_id)
        if inst is None or inst.worker_id is None:
            raise ApiError(404, f"instance {instance_id} not found or not placed")
        w = await ctl.store.get_worker(inst.worker_id)
        if w is None:
            raise ApiError(404, f"worker {inst.worker_id} not found")
        params: dict[str, Any] = {"lines": lines}
        if request_id is not None:
            params["request"] = request_id
        return await call_worker(w, "GET", f"/v1/instances/{instance_id}/logs", s.join_token, timeout_s=5.0,
                                 params=params)

    @app.post("/v1/cluster/instances/{instance_id:path}/events", status_code=204)
    async def instance_event(instance_id: str, body: InstanceEventIn, request: Request) -> Response:
        cluster_read(request)
        CONTROLLER_INSTANCE_EVENTS.labels(body.event).inc()
        log.info("gateway %s reports instance %s %s: %s", body.gateway or "?", instance_id, body.event,
                 body.reason[:200])
        return Response(status_code=204)

    @app.post("/v1/cluster/instances/{instance_id:path}/drain")
    async def drain_instance(instance_id: str, request: Request) -> dict[str, Any]:
        """No new requests (gateways drop it within one refresh); stopped after the drain timeout."""
        admin(request)
        inst = await ctl.store.update_instance(instance_id, enabled=False)
        if inst is None:
            raise ApiError(404, f"instance {instance_id} not found")
        log.info("instance %s draining", instance_id)
        return instance_view(inst, None)

    @app.get("/v1/cluster/instances/{instance_id:path}")
    async def get_instance(instance_id: str, request: Request) -> dict[str, Any]:
        cluster_read(request)
        inst = await ctl.store.get_instance(instance_id)
        if inst is None:
            raise ApiError(404, f"instance {instance_id} not found")
        w = await ctl.store.get_worker(inst.worker_id) if inst.worker_id else None
        view = instance_view(inst, is_alive(w.heartbeat_age, s.worker_ttl) if w else None)
        attach_downloads([view], [w] if w else [])
        return view

    @app.get("/v1/cluster/models")
    async def list_models(request: Request) -> dict[str, Any]:
        cluster_read(request)
        instances, deployments = await asyncio.gather(ctl.store.list_instances(), ctl.store.list_deployments())
        names = sorted({d.name for d in deployments} | {i.model for i in instances})
        deps = {d.name: d for d in deployments}
        data = []
        for n in names:
            mine = [i for i in instances if i.model == n]
            d = deps.get(n)
            data.append({
                "name": n,
                "backend": d.backend if d else (mine[0].backend if mine else None),
                "replicas": d.replicas if d else len(mine),
                "ready": sum(1 for i in mine if i.state == InstanceState.READY),
                "draining": sum(1 for i in mine if not i.enabled),
                "instances": len(mine),
                "deployed": d is not None,
                "error": d.error if d else None,
                "autoscale": d.autoscale.model_dump() if d and d.autoscale else None,
                "last_decision": d.autoscale_status.model_dump() if d and d.autoscale_status else None,
            })
        return {"data": data}

    # -- deployments --------------------------------------------------------------------
    @app.get("/v1/cluster/deployments")
    async def list_deployments(request: Request) -> dict[str, Any]:
        cluster_read(request)
        return {"data": [d.model_dump() for d in await ctl.store.list_deployments()]}

    @app.post("/v1/cluster/deployments", status_code=201)
    async def create_deployment(body: DeploymentSpec, request: Request) -> dict[str, Any]:
        admin(request)
        if await ctl.store.get_deployment(body.name) is not None:
            raise ApiError(409, f"deployment {body.name} exists; change it with PATCH or `modelfleet scale`")
        body = autoscaled_start(body)
        d = await ctl.store.put_deployment(await prepare_deployment(body, catalog, s.source_lookup_timeout))
        log.info("deployment %s created (%s, %d replicas)", d.name, d.backend, d.replicas)
        return d.model_dump()

    @app.get("/v1/cluster/deployments/{name:path}")
    async def get_deployment(name: str, request: Request) -> dict[str, Any]:
        cluster_read(request)
        d = await ctl.store.get_deployment(name)
        if d is None:
            raise ApiError(404, f"deployment {name} not found")
        return d.model_dump()

    @app.patch("/v1/cluster/deployments/{name:path}")
    async def patch_deployment(name: str, body: DeploymentPatch, request: Request) -> dict[str, Any]:
        admin(request)
        d = await ctl.store.get_deployment(name)
        if d is None:
            raise ApiError(404, f"deployment {name} not found")
        changes = body.model_dump(exclude_none=True)
        if "autoscale" in body.model_fields_set:
            policy = body.autoscale
            if policy is not None and d.autoscale is not None:
                # A merge: the fields given change, the others keep their values.
                try:
                    policy = AutoscalePolicy.model_validate(
                        {**d.autoscale.model_dump(), **policy.model_dump(exclude_unset=True)})
                except ValidationError as exc:
                    raise validation_error([{**e, "loc": ("body", "autoscale", *e["loc"])}
                                            for e in exc.errors()]) from None
                body.autoscale = policy
            changes["autoscale"] = policy.model_dump() if policy else None
            if body.autoscale is None:
                changes["autoscale_status"] = None
        scaled = "autoscale" in changes and changes["autoscale"] is not None
        if "replicas" in changes and (scaled or (d.autoscale is not None and "autoscale" not in changes)):
            raise ApiError(409, f"deployment {name} is autoscaled: its replicas are the autoscaler's; set "
                           "min/max replicas in its policy, or send \"autoscale\": null with the replicas to fix "
                           "the count (`modelfleet scale NAME N`)")
        if scaled:
            p = body.autoscale
            assert p is not None
            changes["replicas"] = min(p.max_replicas, max(p.min_replicas, d.replicas))
        d = await ctl.store.put_deployment(Deployment.model_validate({**d.model_dump(), **changes}))
        log.info("deployment %s changed: %s", name, ", ".join(f"{k}={v}" for k, v in changes.items()))
        return d.model_dump()

    @app.delete("/v1/cluster/deployments/{name:path}", status_code=204)
    async def delete_deployment(name: str, request: Request) -> Response:
        admin(request)
        if not await ctl.store.delete_deployment(name):
            raise ApiError(404, f"deployment {name} not found")
        log.info("deployment %s deleted", name)
        return Response(status_code=204)

    # -- load reports (autoscaling) --------------------------------------------------------
    @app.post("/v1/cluster/load", status_code=204)
    async def load_report(body: LoadReport, request: Request) -> Response:
        """A gateway's per-model load, every second; kept in the store for load_report_ttl."""
        cluster_read(request)
        try:
            # Strict, like the heartbeat: a gateway sends exact types (lax pydantic would read
            # ``"expires_in": false`` as 0: found by schemathesis). ``body`` is the documented
            # schema and the lax first pass.
            body = LoadReport.model_validate_json(await request.body(), strict=True)
        except ValidationError as exc:
            raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        await ctl.store.put_load_report(body, s.load_report_ttl)
        return Response(status_code=204)

    @app.get("/v1/cluster/load")
    async def load_reports(request: Request) -> dict[str, Any]:
        cluster_read(request)
        reports = await ctl.store.list_load_reports()
        return {"data": [r.model_dump() for r in reports], "models": model_loads(reports)}

    # -- routes for gateways --------------------------------------------------------------
    @app.get("/v1/cluster/routes", responses={304: {"description": "no change since `since` within `wait`"}})
    async def routes(request: Request, since: int = -1, wait: float = Query(0.0, ge=0.0, le=120.0),
                     seen: int = Query(-1, le=MAX_REVISION), cluster: str = "") -> Any:
        """``seen`` and ``cluster``: the revision and cluster identity the gateway serves. A
        gateway ahead of the store (restored from an older copy) moves the store's revision
        past its own, so that it never has to step back."""
        cluster_read(request)
        if not ctl.ready:
            # Gateways keep their table and try another controller.
            raise ApiError(503, f"store unavailable: {ctl.not_ready_reason}", code="store_unavailable")
        if ctl.revisions.revision <= since and wait > 0:
            CONTROLLER_ROUTE_WAITERS.inc()
            try:
                changed = await ctl.revisions.wait_past(since, wait)
            finally:
                CONTROLLER_ROUTE_WAITERS.dec()
            if not changed:
                return Response(status_code=304)
            if not ctl.ready:
                raise ApiError(503, f"store unavailable: {ctl.not_ready_reason}", code="store_unavailable")
        revision = max(ctl.revisions.revision, await ctl.store.get_revision())
        if seen > revision and cluster and cluster == ctl.cluster_id:
            revision = await ctl.store.advance_revision(seen + 1)
            log.warning("a gateway serves revision %d, above the store's: store revision advanced to %d "
                        "(store restored from an older copy?)", seen, revision)
        if revision <= since:
            return Response(status_code=304)
        return await ctl.route_table(revision)

    @app.get("/v1/cluster/leader")
    async def leader(request: Request) -> dict[str, Any]:
        cluster_read(request)
        lease = await ctl.store.get_lease(LEADER_LEASE)
        return {
            "lease": lease.model_dump() if lease else None,
            "this_controller": s.controller_id,
            "this_is_leader": ctl.elector.is_leader,
        }

    app.include_router(models_router(ctl, catalog, s.join_token, admin, cluster_read))

    # -- api keys -------------------------------------------------------------------------
    @app.post("/v1/cluster/keys", status_code=201)
    async def create_key(body: KeyIn, request: Request) -> dict[str, Any]:
        admin(request)
        key_id, secret, digest = new_api_key()
        k = await ctl.store.create_api_key(ApiKey(id=key_id, name=body.name, secret_hash=digest))
        log.info("api key %s (%s) created", k.id, k.name)
        return {"id": k.id, "name": k.name, "key": secret, "created_at": k.created_at}

    @app.get("/v1/cluster/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        admin(request)
        return {"data": [k.model_dump(exclude={"secret_hash"}) for k in await ctl.store.list_api_keys()]}

    @app.post("/v1/cluster/keys/open")
    async def open_inference(request: Request) -> dict[str, Any]:
        """Inference without any key again: only as this explicit act, never because the keys
        are gone (revoked, or a store that lost them)."""
        admin(request)
        live = [k.id for k in await ctl.store.list_api_keys() if not k.revoked]
        if live:
            raise ApiError(409, f"{len(live)} API key(s) are not revoked ({', '.join(live[:5])}); revoke them "
                                "before opening inference to anyone", code="keys_exist")
        await ctl.store.open_inference()
        log.warning("inference OPENED by an admin: gateways serve requests without an API key")
        return {"auth": "opened"}

    @app.post("/v1/cluster/store/accept")
    async def accept_store(request: Request, replaces: str | None = Query(None, max_length=128)
                           ) -> dict[str, Any]:
        """The operator's answer to a store that lost its state: serve it as it is now."""
        admin(request)
        return await ctl.accept_store(replaces)

    @app.delete("/v1/cluster/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str, request: Request) -> Response:
        admin(request)
        if not await ctl.store.revoke_api_key(key_id):
            raise ApiError(404, f"api key {key_id} not found")
        log.info("api key %s revoked", key_id)
        return Response(status_code=204)

    return HeartbeatEndpoint(ctl, RejectNul(app))


def run_controller(settings: ControllerSettings) -> None:
    """Blocking: check the store URL, then serve. A wrong URL, or a Redis that keeps nothing
    across a restart (unless allowed), exits with one line."""
    import uvicorn

    desc = describe_url(settings.store_url)
    try:
        refusal = asyncio.run(_check_store(open_store(settings.store_url), settings.allow_volatile_store))
    except (StoreConfigError, StoreUnavailable) as exc:
        raise SystemExit(f"modelfleet controller: cannot use store {desc}: {exc}") from None
    if refusal:
        raise SystemExit(f"modelfleet controller: refusing store {desc}: {refusal}")
    if not settings.admin_token:
        log.warning("controller runs WITHOUT an admin token: management calls are open to anyone who "
                    "can reach %s:%d", settings.host, settings.port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                access_log=False, log_config=None)  # logs go through logs.py


def volatile_store_refusal(scheme: str, persistence: Persistence, allowed: bool) -> str | None:
    """Why the controller must not start on this store, or None (after a warning line when the
    store is volatile but allowed, or its persistence cannot be told)."""
    if persistence.kind == "unknown":
        log.warning("cannot tell whether the %s store keeps its data across a restart: %s; make sure it has RDB "
                    "snapshots or AOF", scheme, persistence.detail)
        return None
    if persistence.kind != "volatile":
        return None
    if scheme == "memory":
        log.warning("store memory:// keeps nothing when this process ends (tests and demos only); every restart "
                    "is a new cluster")
        return None
    if allowed:
        log.warning("the %s store is VOLATILE (allowed by --allow-volatile-store): %s", scheme, persistence.detail)
        return None
    return (f"{persistence.detail}; give it persistence (appendonly yes, or a save schedule), or pass "
            "--allow-volatile-store (MODELFLEET_ALLOW_VOLATILE_STORE=1) to run on it anyway")


async def _check_store(store: Store, allow_volatile: bool, wait: float = 10.0) -> str | None:
    """At start a store must answer within ``wait`` seconds (a running controller rides outages).
    Returns why it is refused (nothing is written into it then), or None once it is migrated."""
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                refusal = volatile_store_refusal(store.url_scheme, await store.persistence(), allow_volatile)
                if refusal is None:
                    await store.migrate()
                return refusal
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
    finally:
        await store.close()
