"""The route table: parsed from the controller's payload, persisted to disk, kept fresh.

The controller's ``GET /v1/cluster/routes?since=REV&wait=S`` answers 200 with the table as
soon as the routing revision passes REV, or 304 after S seconds without a change. The
gateway long-polls one controller of its list; on any failure it moves to the next. With
every controller down it keeps the last table (principle 1) and says "stale"; the table is
also written to disk on every change (atomic rename), so a gateway that restarts while the
controllers are down serves from it.

The gateway remembers (snapshot included) the cluster identity of its table, its revision and
whether that cluster required API keys. It refuses a table of another cluster (a store that
lost its state) unless the table says it replaces ours (an operator accepted it), and a lower
revision of the same cluster; it keeps keys required unless an admin opened inference
(``judge_table``, ``remember``). A table that would drop most instances at once is not
believed at once either (``sudden_loss``, ``Grace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    cluster_id: str = ""  # "" from a controller that does not publish one
    auth: str = "none"  # the store's auth state: "none" | "required" | "opened"
    replaces: frozenset[str] = frozenset()  # cluster ids an operator accepted this one in place of
    # How each model picks an instance: "p2c" or "prefix"; a model not listed: "p2c".
    routing: dict[str, str] = field(default_factory=dict, compare=False)
    # Models whose requests wait for an instance when none is ready (one is starting, or can
    # be started on demand); absent (a controller without the field): held.
    no_hold: frozenset[str] = field(default_factory=frozenset, compare=False)


EMPTY = RouteTable(revision=-1, controller_id="", models={}, key_hashes=frozenset(), payload={})


@dataclass(frozen=True)
class ClusterMemory:
    """What a gateway remembers of the cluster it serves, across tables and restarts."""

    cluster_id: str = ""
    revision: int = -1
    auth_required: bool = False  # the cluster required API keys once

    def as_dict(self) -> dict[str, Any]:
        return {"cluster_id": self.cluster_id, "revision": self.revision, "auth_required": self.auth_required}


class TableRefused(Exception):
    """A controller's table that must not replace ours (another cluster, or an older revision)."""


def judge_table(memory: ClusterMemory, table: RouteTable) -> str | None:
    """Why ``table`` must not replace the one we serve, or None to take it.

    - another cluster's table (the store lost its state, or the controller uses another store)
      is refused, unless it replaces ours: an operator accepted the new store;
    - a lower revision of the same cluster is refused: a revision never goes backwards for a
      reader (the controller moves the store's revision past ours when we tell it ours)."""
    if memory.cluster_id and table.cluster_id and table.cluster_id != memory.cluster_id:
        if memory.cluster_id in table.replaces:
            return None
        return (f"its table is of cluster {table.cluster_id}, this gateway serves cluster {memory.cluster_id} "
                "(the store lost its state, or the controller uses another store); keeping the last good table "
                f"until an operator accepts the new store (modelfleet store accept --replaces {memory.cluster_id})")
    if table.cluster_id == memory.cluster_id and table.revision < memory.revision:
        return f"its revision {table.revision} is below {memory.revision}, which this gateway serves"
    return None


def remember(memory: ClusterMemory, table: RouteTable) -> tuple[RouteTable, ClusterMemory]:
    """The table as served and the new memory. A cluster that required API keys keeps
    requiring them, whatever the table's key list says (empty after a lost store, or from a
    controller that forgot), until an admin opens inference explicitly (auth "opened")."""
    if memory.auth_required and not table.auth_required and table.auth != "opened":
        table = replace(table, auth_required=True)
    return table, ClusterMemory(table.cluster_id or memory.cluster_id, table.revision, table.auth_required)


def sudden_loss(previous: RouteTable, new: RouteTable) -> str | None:
    """Why ``new`` is not to be believed at once, or None.

    The reconciler's panic rule, applied to routing: a table in which more than half of the
    routable instances (of at least two) vanish at once is much more likely a fault of the
    control plane (a store that came back, workers that could not heartbeat) than that many
    machines dying in the same second. Models that are gone from ``new`` altogether (deleted
    deployments) do not count: that is an operator's act."""
    before = {i.id for name, insts in previous.models.items() if name in new.models for i in insts if i.enabled}
    if len(before) < 2:
        return None
    after = {i.id for insts in new.models.values() for i in insts}
    gone = before - after
    if 2 * len(gone) <= len(before):
        return None
    return f"{len(gone)} of {len(before)} routable instances would vanish at once"


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
    return replace(new, models=models, endpoints={**previous.endpoints, **new.endpoints},
                   routing={**previous.routing, **new.routing})


@dataclass(frozen=True)
class Grace:
    """A hold on missing instances (see keep_missing): from ``since`` (monotonic), on a table of
    revision ``revision``; started on reconnecting to the controllers or by ``sudden_loss``."""

    since: float
    revision: int
    ttl: float
    reason: str = "reconnected to the controllers"

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
        auth_required = bool(payload.get("auth_required", bool(keys)))
        return RouteTable(revision=int(payload["revision"]), controller_id=str(payload.get("controller_id", "")),
                          models=models, key_hashes=keys, payload=payload, routing=parse_routing(payload["models"]),
                          heartbeat_ttl=float(payload.get("heartbeat_ttl") or 6.0),
                          auth_required=auth_required, endpoints=endpoints,
                          cluster_id=str(payload.get("cluster_id") or ""),
                          auth=str(payload.get("auth") or ("required" if auth_required else "none")),
                          replaces=frozenset(str(x) for x in payload.get("replaces") or ()),
                          no_hold=frozenset(str(m["name"]) for m in payload["models"] if m.get("hold") is False))
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
def save_snapshot(path: Path, payload: dict[str, Any], fetched_at: float,
                  memory: ClusterMemory | None = None) -> None:
    """Write atomically: a unique temp file in the same directory, fsync, rename. Several
    gateway processes may write the same path; each rename is whole. ``memory`` goes with the
    table: a gateway restarted from it still knows its cluster and that keys were required."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    doc: dict[str, Any] = {"fetched_at": fetched_at, "routes": payload}
    if memory is not None:
        doc["memory"] = memory.as_dict()
    data = orjson.dumps(doc)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # key hashes inside
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_snapshot(path: Path) -> tuple[RouteTable, float, ClusterMemory] | None:
    """(table as served, wall time it was fetched, memory) or None when absent or unreadable (logged)."""
    try:
        raw = orjson.loads(path.read_bytes())
        table = parse_routes(raw["routes"])
        m = raw.get("memory") or {}
        memory = ClusterMemory(str(m.get("cluster_id", table.cluster_id)), int(m.get("revision", table.revision)),
                               bool(m.get("auth_required", table.auth_required)))
        table, _ = remember(memory, table)
        return table, float(raw["fetched_at"]), memory
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
        count_event: Callable[[str], None] = lambda event: None,
    ) -> None:
        self.controllers = controllers
        self.headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.on_table = on_table
        self.snapshot_path = snapshot_path
        self.poll_wait_s = poll_wait_s
        self.retry_pause_s = retry_pause_s
        self.count_event = count_event  # metrics: route tables refused, keys kept required
        self.freshness = Freshness()
        self.memory = ClusterMemory()
        self.revision = -1
        self.current = 0  # index of the controller in use
        self.session: aiohttp.ClientSession | None = None
        self.polling = False
        self._keys_held = False  # logged once: a table said "no keys" while this cluster required them
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle
    def load_snapshot(self) -> bool:
        if self.snapshot_path is None:
            return False
        snap = load_snapshot(self.snapshot_path)
        if snap is None:
            return False
        table, fetched_at, self.memory = snap
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
        params = {"since": str(self.revision if steady else -1), "wait": str(wait), "seen": str(self.revision),
                  "cluster": self.memory.cluster_id}
        timeout = aiohttp.ClientTimeout(total=wait + 5.0, sock_connect=2.0)
        async with self.session.get(url, params=params, headers=self.headers, timeout=timeout) as r:
            if r.status == 304:
                self._confirmed(base)
                return
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            payload = await r.json(loads=orjson.loads, content_type=None)
        table = self.take(parse_routes(payload))
        self.revision = table.revision
        # Back in touch after being cut off (or starting from a snapshot): say so, see keep_missing.
        self.on_table(table, not self.freshness.fresh and self.freshness.loaded)
        self._confirmed(base)
        if self.snapshot_path is not None:
            # Off the event loop: a slow disk must not stall requests.
            self._keep(asyncio.create_task(self._save(self.snapshot_path, payload, self.memory)))

    def take(self, table: RouteTable) -> RouteTable:
        """``table`` as this gateway serves it, after judge_table and remember; raises
        TableRefused (the controller counts as failed: we keep our table, try the next one)."""
        refused = judge_table(self.memory, table)
        if refused is not None:
            self.count_event("refused_cluster" if table.cluster_id != self.memory.cluster_id else "refused_revision")
            raise TableRefused(refused)
        if self.memory.cluster_id and table.cluster_id and table.cluster_id != self.memory.cluster_id:
            log.warning("cluster %s replaced by cluster %s (accepted by an operator), revision %d",
                        self.memory.cluster_id, table.cluster_id, table.revision)
        served, memory = remember(self.memory, table)
        if served.auth_required and not table.auth_required:
            if not self._keys_held:
                self.count_event("auth_kept_required")
                log.warning("the controller's table has no API key requirement, but cluster %s required keys: "
                            "keys stay required (an admin opens inference with `modelfleet keys open`)",
                            memory.cluster_id or "?")
            self._keys_held = True
        else:
            self._keys_held = False
        self.memory = memory
        return served

    async def _save(self, path: Path, payload: dict[str, Any], memory: ClusterMemory) -> None:
        try:
            await asyncio.to_thread(save_snapshot, path, payload, time.time(), memory)
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



def parse_routing(models: list[dict[str, Any]]) -> dict[str, str]:
    """Model -> routing mode. A mode this gateway does not know (a newer controller) is
    served as "p2c", which balances correctly, only without cache affinity."""
    out: dict[str, str] = {}
    for m in models:
        mode = m.get("routing")
        out[str(m["name"])] = mode if mode in ("p2c", "prefix") else "p2c"
    return out
