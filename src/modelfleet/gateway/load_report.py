"""Load reports (issue 12): every second, each gateway process tells a controller (any of its
list, like the long-poll) its per-model load, requests in flight plus queued (held ones
included: that is how a model at zero replicas gets started), and each instance's requests
in flight with whether this process still sends it new ones (the drain of a replica ends
when every gateway reports it idle and out of rotation).

The controller keeps each report in the store with a time to live, so a gateway that dies
stops counting within it. A report that cannot be sent is dropped (the next one carries the
current numbers); it is never retried into a backlog."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from modelfleet.gateway.pool import Pool
from modelfleet.gateway.routes import RouteWatcher

log = logging.getLogger("modelfleet.gateway")

INTERVAL_S = 1.0


def load_payload(pool: Pool, source: str, revision: int) -> dict[str, Any]:
    """The report of one gateway process (pure: reads the pool, changes nothing)."""
    models = {name: {"in_flight": m.in_flight, "queued": len(m.waiters)} for name, m in pool.models.items()}
    instances = {
        i.id: {"in_flight": i.in_flight, "enabled": i.enabled and i.weight > 0} for i in pool.instances.values()
    }
    for i in list(pool.retired.values()):  # left the table, requests still on them
        if i.id not in instances and i.in_flight > 0:
            instances[i.id] = {"in_flight": i.in_flight, "enabled": False}
    return {"source": source, "revision": revision, "models": models, "instances": instances}


class LoadReporter:
    def __init__(
        self, pool: Pool, watcher: RouteWatcher, source: str, revision: Any, interval_s: float = INTERVAL_S
    ) -> None:
        self.pool, self.watcher, self.source = pool, watcher, source
        self.revision = revision  # callable: the revision served now
        self.interval_s = interval_s
        self.failing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        if self.watcher.controllers:
            self._task = asyncio.create_task(self.run(), name="load-reporter")

    def nudge(self) -> None:
        """Report now (a request was just held for a model with no ready instance: the sooner
        the autoscaler knows, the sooner a replica starts)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def run(self) -> None:
        headers = {**self.watcher.headers, "content-type": "application/json"}
        while True:
            try:
                body = orjson.dumps(load_payload(self.pool, self.source, self.revision()))
                status, data, _ = await self.watcher.request(
                    "POST", "/v1/cluster/load", headers=headers, data=body, timeout_s=5.0
                )
                ok = status < 300
                if not ok and not self.failing:
                    log.warning("load report refused by the controller: HTTP %d %s", status, data[:200])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let reporting touch serving
                ok = False
                if not self.failing:
                    log.warning("load report not sent: %s", exc)
            if ok and self.failing:
                log.info("load reports sent again")
            self.failing = not ok
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
