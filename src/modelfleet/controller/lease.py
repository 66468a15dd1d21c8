"""Leadership: the holder of a store lease runs the singleton loops (GC, scheduler, reconciler).

A holder that cannot renew stops those loops at once: it renews every ttl/3 and each
renewal may take at most ttl/3, so a slow or absent store cannot leave two leaders acting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from modelfleet.metrics import CONTROLLER_IS_LEADER, CONTROLLER_LEASE_TOKEN
from modelfleet.store import Store, StoreError

log = logging.getLogger("modelfleet.controller")

LEADER_LEASE = "controller-leader"
SingletonLoop = Callable[[int], Awaitable[None]]  # receives the fencing token


class LeaderElector:
    def __init__(self, store: Store, holder: str, ttl: float, loops: list[SingletonLoop],
                 can_lead: Callable[[], bool] = lambda: True) -> None:
        self.store, self.holder, self.ttl, self.loops = store, holder, ttl, loops
        # False while the controller must not act on the store (outage, or a store that lost
        # its state): the singleton loops would act on what is left of it.
        self.can_lead = can_lead
        self.token: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def is_leader(self) -> bool:
        return self.token is not None

    async def run(self) -> None:
        try:
            while True:
                await self._tick()
                await asyncio.sleep(self.ttl / 3)
        finally:
            await self._step_down("controller stopping")
            with contextlib.suppress(Exception):
                await self.store.release_lease(LEADER_LEASE, self.holder)

    async def _tick(self) -> None:
        if not self.can_lead():
            await self._step_down("store not ready")
            return
        try:
            lease = await asyncio.wait_for(self.store.acquire_lease(LEADER_LEASE, self.holder, self.ttl), self.ttl / 3)
        except (StoreError, TimeoutError, OSError) as exc:
            # A holder that cannot renew stops at once; the renew itself is bounded by ttl/3,
            # so this happens well before the store could give the lease to someone else.
            await self._step_down(f"cannot renew lease: {exc or type(exc).__name__}")
            return
        if lease is None:
            await self._step_down("lease held by another controller")
            return
        if self.token != lease.token:
            await self._step_down("fencing token changed")
            self.token = lease.token
            CONTROLLER_IS_LEADER.set(1)
            CONTROLLER_LEASE_TOKEN.set(lease.token)
            log.info("controller %s became leader (fencing token %d)", self.holder, lease.token)
            self._tasks = [asyncio.create_task(self._guard(loop, lease.token)) for loop in self.loops]

    async def _guard(self, loop: SingletonLoop, token: int) -> None:
        while True:
            try:
                await loop(token)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failing loop must not die silently (DB-GPT's checker thread did): log and rerun.
                log.exception("singleton loop %s failed; restarting in 1 s", getattr(loop, "__name__", loop))
                await asyncio.sleep(1)

    async def _step_down(self, reason: str) -> None:
        if self.token is None:
            return
        log.info("controller %s stopped leading: %s", self.holder, reason)
        self.token = None
        CONTROLLER_IS_LEADER.set(0)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
