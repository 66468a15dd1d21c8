"""The route table: parsed from the controller's payload, persisted to disk, kept fresh.

The controller's ``GET /v1/cluster/routes?since=REV&wait=S`` answers 200 with the table as
soon as the routing revision passes REV, or 304 after S seconds without a change. The
gateway long-polls one controller of its list; on any failure it moves to the next. With
every controller down it keeps the last table (principle 1) and says "stale"; the table is
also written to disk on every change (atomic rename), so a gateway that restarts while the
controllers are down serves from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from modelfleet.config import private_dir

log = logging.getLogger("modelfleet.gateway")


@dataclass(frozen=True)
class InstanceRoute:
    id: str
    worker_id: str
    endpoint: str  # base URL without /v1
    weight: int
    max_concurrency: int
    enabled: bool  # False: draining or disabled, no new requests


@dataclass(frozen=True)
class RouteTable:
    revision: int
    controller_id: str
    models: dict[str, tuple[InstanceRoute, ...]]
    key_hashes: frozenset[str]
    payload: dict[str, Any] = field(repr=False, compare=False)
    heartbeat_ttl: float = 6.0
    # True once any API key was ever created (revoked ones included): inference needs a key.
    auth_required: bool = False
    # What each model serves (chat, completions, embeddings); a model not listed: unknown, all.
    endpoints: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)


EMPTY = RouteTable(revision=-1, controller_id="", models={}, key_hashes=frozenset(), payload={})


def keep_missing(previous: RouteTable, new: RouteTable) -> RouteTable:
    """``new``, plus the instances (and models) of ``previous`` that ``new`` lacks.

    Used for one heartbeat TTL after the gateway gets back in touch with the controllers:
    right after an outage (of the controllers, the store, or our link to them) workers that
    could not heartbeat look dead until their next heartbeat, and trusting that would turn a
    healthy cluster into 503s for a few seconds. Keys always come from ``new``, so a
    revocation is never delayed; an instance that really died is handled by failover."""
    models = dict(new.models)
    for name, old in previous.models.items():
        if name not in models:
            models[name] = old
            continue
        have = {i.id for i in models[name]}
        extra = tuple(i for i in old if i.id not in have)
        if extra:
            models[name] += extra
    return RouteTable(revision=new.revision, controller_id=new.controller_id, models=models,
                      key_hashes=new.key_hashes, payload=new.payload, heartbeat_ttl=new.heartbeat_ttl,
                      auth_required=new.auth_required, endpoints={**previous.endpoints, **new.endpoints})


@dataclass(frozen=True)
class Grace:
    """The reconnect grace: from ``since`` (monotonic) on a table of revision ``revision``."""

    since: float
    revision: int
    ttl: float

    def active(self, now: float, revision: int) -> bool:
        """Until one heartbeat TTL has passed *and* the revision has moved past the one we
        reconnected at: a controller that has just started may serve its first table (worker
        dead) at an unchanged revision for a while. Never longer than 10 TTLs."""
        if now - self.since >= 10 * self.ttl:
            return False
        return now - self.since < self.ttl or revision <= self.revision


def parse_routes(payload: dict[str, Any]) -> RouteTable:
    """Validate and index a routes payload. Raises ValueError on anything malformed, so a
    broken answer never replaces a good table."""
    try:
        models: dict[str, tuple[InstanceRoute, ...]] = {}
        for m in payload["models"]:
            insts = []
            for i in m["instances"]:
                enabled = bool(i.get("enabled", True)) and i.get("state", "ready") == "ready"
                insts.append(InstanceRoute(
                    id=str(i["id"]), worker_id=str(i.get("worker_id") or ""),
                    endpoint=str(i["endpoint"]).rstrip("/"), weight=int(i.get("weight", 100)),
                    max_concurrency=max(1, int(i.get("max_concurrency", 4))), enabled=enabled,
                ))
            models[str(m["name"])] = tuple(insts)
        endpoints = parse_endpoints(payload["models"])
        keys = frozenset(str(k["secret_hash"]).lower() for k in payload.get("api_keys") or ())
        return RouteTable(revision=int(payload["revision"]), controller_id=str(payload.get("controller_id", "")),
                          models=models, key_hashes=keys, payload=payload,
                          heartbeat_ttl=float(payload.get("heartbeat_ttl") or 6.0),
                          auth_required=bool(payload.get("auth_required", bool(keys))), endpoints=endpoints)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed routes payload: {exc!r}") from exc


def parse_endpoints(models: list[dict[str, Any]]) -> dict[str, frozenset[str]]:
    """Model -> the endpoints it serves, for models whose entry says (a controller without
    this field, or a model of unknown backend, leaves every endpoint open)."""
    out: dict[str, frozenset[str]] = {}
    for m in models:
        served = m.get("endpoints")
        if served is not None:
            out[str(m["name"])] = frozenset(str(e) for e in served)
    return out


# -- snapshot -------------------------------------------------------------------------------
def save_snapshot(path: Path, payload: dict[str, Any], fetched_at: float) -> None:
    """Write atomically: a unique temp file in the same directory, fsync, rename. Several
    gateway processes may write the same path; each rename is whole."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = orjson.dumps({"fetched_at": fetched_at, "routes": payload})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # key hashes inside
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_snapshot(path: Path) -> tuple[RouteTable, float] | None:
    """(table, wall time it was fetched) or None when absent or unreadable (logged)."""
    try:
        raw = orjson.loads(path.read_bytes())
        return parse_routes(raw["routes"]), float(raw["fetched_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("route snapshot %s unreadable, ignored: %s", path, exc)
        return None


# -- freshness ------------------------------------------------------------------------------
@dataclass
class Freshness:
    """What /health/ready and /v1/gateway/status say about the table."""

    loaded: bool = False
    fresh: bool = False
    source: str = "none"  # "controller" | "snapshot" | "none"
    confirmed_at: float = 0.0  # wall time a controller last confirmed the table (200 or 304)
    controller: str | None = None  # controller in use (last that answered)

    def age_s(self, now: float, polling: bool) -> float | None:
        """Seconds since a controller last vouched for the table. A long-poll held open by a
        healthy controller vouches continuously (it would have answered a change), so a fresh
        table has age 0; a stale one ages from its last confirmation."""
        if not self.loaded:
            return None
        if self.fresh and polling:
            return 0.0
        return max(0.0, now - self.confirmed_at)


def is_ready(f: Freshness, instance_count: int) -> bool:
    """Ready while it can route: a table confirmed by a controller, or a stale one that still
    has instances. A stale empty table (or none) is not ready: another gateway may do better."""
    return f.loaded and (f.fresh or instance_count > 0)


class RouteWatcher:
    """Long-polls the controller list and hands every new table to ``on_table``."""

    def __init__(
        self,
        controllers: list[str],
        admin_token: str | None,
        on_table: Callable[[RouteTable, bool], None],
        snapshot_path: Path | None,
        poll_wait_s: float = 10.0,
        retry_pause_s: float = 0.25,
    ) -> None:
        self.controllers = controllers
        self.headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.on_table = on_table
        self.snapshot_path = snapshot_path
        self.poll_wait_s = poll_wait_s
        self.retry_pause_s = retry_pause_s
        self.freshness = Freshness()
        self.revision = -1
        self.current = 0  # index of the controller in use
        self.session: aiohttp.ClientSession | None = None
        self.polling = False
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle
    def load_snapshot(self) -> bool:
        if self.snapshot_path is None:
            return False
        snap = load_snapshot(self.snapshot_path)
        if snap is None:
            return False
        table, fetched_at = snap
        self.revision = table.revision
        f = self.freshness
        f.loaded, f.fresh, f.source, f.confirmed_at = True, False, "snapshot", fetched_at
        self.on_table(table, False)
        log.info("route table revision %d loaded from snapshot %s (%.0f s old), stale until a controller "
                 "answers", table.revision, self.snapshot_path, time.time() - fetched_at)
        return True

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )
        if self.controllers:
            self._task = asyncio.create_task(self.run(), name="route-watcher")
        else:
            log.warning("no controller given: the gateway serves only its snapshot, if any")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.session is not None:
            await self.session.close()

    @property
    def controller(self) -> str | None:
        return self.controllers[self.current] if self.controllers else None

    # -- the loop
    async def run(self) -> None:
        failures_in_row = 0
        while True:
            base = self.controllers[self.current]
            try:
                self.polling = True
                await self.poll_once(base)
                failures_in_row = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.polling = False
                failures_in_row += 1
                self._failed(base, exc, failures_in_row)
                if failures_in_row % len(self.controllers) == 0:
                    # A whole round failed: pause briefly. Short, so that a controller coming
                    # back is seen within about a second.
                    await asyncio.sleep(self.retry_pause_s * min(4, failures_in_row // len(self.controllers)))

    async def poll_once(self, base: str) -> None:
        assert self.session is not None
        # First contact with this controller (at start, after a failure, after a switch): ask
        # for the whole table at once, without waiting, so the switch is confirmed (and logged)
        # right away and a controller on another store cannot leave us on a wrong revision.
        f = self.freshness
        steady = f.fresh and f.controller == base
        wait = self.poll_wait_s if steady else 0.0
        url = f"{base}/v1/cluster/routes"
        params = {"since": str(self.revision if steady else -1), "wait": str(wait)}
        timeout = aiohttp.ClientTimeout(total=wait + 5.0, sock_connect=2.0)
        async with self.session.get(url, params=params, headers=self.headers, timeout=timeout) as r:
            if r.status == 304:
                self._confirmed(base)
                return
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            payload = await r.json(loads=orjson.loads, content_type=None)
        table = parse_routes(payload)
        if table.revision < self.revision:
            # A lower revision means a different store (e.g. a restarted memory:// one), or a
            # lagging replica. Take it: it is what the cluster says now.
            log.warning("controller %s reports revision %d below ours (%d); taking its table",
                        base, table.revision, self.revision)
        self.revision = table.revision
        # Back in touch after being cut off (or starting from a snapshot): say so, see keep_missing.
        self.on_table(table, not self.freshness.fresh and self.freshness.loaded)
        self._confirmed(base)
        if self.snapshot_path is not None:
            # Off the event loop: a slow disk must not stall requests.
            self._keep(asyncio.create_task(self._save(self.snapshot_path, payload)))

    async def _save(self, path: Path, payload: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(save_snapshot, path, payload, time.time())
        except OSError as exc:
            log.warning("could not write the route snapshot %s: %s", path, exc)

    @staticmethod
    def _keep(task: asyncio.Task[Any]) -> None:
        _background.add(task)
        task.add_done_callback(_background.discard)

    def _confirmed(self, base: str) -> None:
        f = self.freshness
        if not f.fresh:
            was = "stale" if f.loaded else "none"
            log.info("route table fresh (was %s): controller %s, revision %d", was, base, self.revision)
        if f.controller is not None and f.controller != base:
            log.info("controller switched: %s -> %s", f.controller, base)
        f.loaded, f.fresh, f.source, f.confirmed_at, f.controller = True, True, "controller", time.time(), base

    def _failed(self, base: str, exc: Exception, failures_in_row: int) -> None:
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        if failures_in_row <= len(self.controllers) or failures_in_row % 100 == 0:
            log.warning("controller %s failed (%s)", base, reason[:200])
        if failures_in_row >= len(self.controllers) and self.freshness.fresh:
            self.freshness.fresh = False
            log.warning("route table stale: no controller answers; serving revision %d", self.revision)
        self.current = (self.current + 1) % len(self.controllers)

    # -- other calls to controllers
    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, data: bytes | None = None,
        params: Any = None, timeout_s: float = 10.0,
    ) -> tuple[int, bytes, str]:
        """One call to the controller in use, then the others: (status, body, content type).
        Raises ConnectionError when none answers."""
        assert self.session is not None
        problems = []
        n = len(self.controllers)
        for k in range(n):
            base = self.controllers[(self.current + k) % n]
            try:
                async with self.session.request(
                    method, f"{base}{path}", headers=headers if headers is not None else self.headers,
                    data=data, params=params, timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=2.0),
                ) as r:
                    return r.status, await r.read(), r.headers.get("content-type", "")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problems.append(f"{base}: {type(exc).__name__}")
        raise ConnectionError("no controller answered: " + "; ".join(problems))

    def report(self, instance_id: str, event: str, reason: str, gateway: str) -> None:
        """Tell a controller an instance was ejected or restored; fire and forget."""
        if not self.controllers or self.session is None:
            return
        body = orjson.dumps({"event": event, "reason": reason[:500], "gateway": gateway})

        async def send() -> None:
            from urllib.parse import quote

            headers = {**self.headers, "content-type": "application/json"}
            try:
                status, _, _ = await self.request("POST", f"/v1/cluster/instances/{quote(instance_id, safe='')}"
                                                  "/events", headers=headers, data=body, timeout_s=5.0)
                if status >= 300:
                    log.debug("controller refused %s event for %s: HTTP %d", event, instance_id, status)
            except ConnectionError as exc:
                log.debug("could not report %s of %s: %s", event, instance_id, exc)

        self._keep(asyncio.create_task(send()))


# Strong references to fire-and-forget tasks (the loop keeps only weak ones).
_background: set[asyncio.Task[Any]] = set()

