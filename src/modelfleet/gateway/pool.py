"""Live state of one gateway process: instances with their in-flight counts, per-model
queues, ejections. The decisions come from balancer, admission and ejection (pure); this
module applies them and does the bookkeeping.

Counts are per process. Several gateways (or processes of one gateway) each keep their
own, and each enforces its share of an instance's max_concurrency (admission.process_share).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable

from modelfleet.gateway import admission, balancer, ejection, prefix
from modelfleet.gateway.routes import InstanceRoute, RouteTable
from modelfleet.gateway.settings import GatewaySettings

log = logging.getLogger("modelfleet.gateway")


class Overloaded(Exception):
    """429: every instance full and the queue full, or the wait ran out."""

    def __init__(self, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoInstance(Exception):
    """503: the model is known but no instance can take the request."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Inst:
    """One instance as this process sees it."""

    __slots__ = (
        "aborts", "attempts", "ejected_until", "ejections", "enabled", "endpoint", "failed_attempts", "failures",
        "id", "in_flight", "last_ejected_at", "max_concurrency", "model", "weight", "worker_id",
    )

    def __init__(self, route: InstanceRoute, model: ModelState, slots: int) -> None:
        self.id = route.id
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.ejected_until = 0.0  # monotonic
        self.ejections = 0  # in a row, for the growing cooldown
        self.last_ejected_at = 0.0
        self.attempts = 0  # requests sent to it by this process
        self.failed_attempts = 0
        # Attempts still waiting for this instance's answer (nothing sent to the client yet):
        # expired at once when the instance leaves the route table, so they fail over.
        self.aborts: set[asyncio.Timeout] = set()
        self.update(route, model, slots)

    def update(self, route: InstanceRoute, model: ModelState, slots: int) -> None:
        self.model = model
        self.worker_id = route.worker_id
        self.endpoint = route.endpoint  # base URL; the request path (/v1/…) is appended
        self.weight = route.weight
        self.max_concurrency = slots
        self.enabled = route.enabled

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


class Waiter:
    __slots__ = ("cold", "exclude", "fut")

    def __init__(self, fut: asyncio.Future[Inst], exclude: tuple[str, ...], cold: bool = False) -> None:
        self.fut = fut
        self.exclude = exclude
        # Held for a cold start (no routable instance when it arrived): a table without a
        # routable instance keeps it waiting instead of failing it.
        self.cold = cold


class ModelState:
    __slots__ = ("hold", "instances", "latency_ewma", "name", "prefixes", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.hold = True  # with no ready instance, requests wait for one (see RouteTable.no_hold)
        self.instances: list[Inst] = []
        self.waiters: deque[Waiter] = deque()
        self.latency_ewma = 0.0  # seconds, completed requests
        # Routing "prefix": what this process sent where (prefix.py); None: plain P2C.
        self.prefixes: prefix.PrefixIndex | None = None

    @property
    def slots(self) -> int:
        return sum(i.max_concurrency for i in self.instances if balancer.routable(i))

    @property
    def in_flight(self) -> int:
        return sum(i.in_flight for i in self.instances)

    @property
    def routable(self) -> int:
        return sum(1 for i in self.instances if balancer.routable(i))


class Pool:
    def __init__(
        self,
        settings: GatewaySettings,
        report: Callable[[str, str, str], None] | None = None,
        process_index: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.s = settings
        self.models: dict[str, ModelState] = {}
        self.instances: dict[str, Inst] = {}
        self.report = report or (lambda _id, _event, _reason: None)
        self.process_index = process_index
        self.rng = rng or random.Random()
        self.ejections_total = 0
        # (model, outcome) of each prefix-routed choice: "cached", "home" or "spilled" (metrics).
        self.on_prefix: Callable[[str, str], None] = lambda _model, _outcome: None
        # Set by the first table applied (snapshot or controller): until then a request for
        # any model is held (see Proxy.handle), not answered 404.
        self.loaded = asyncio.Event()
        self.on_hold: Callable[[], None] = lambda: None  # a request is held for a cold start
        # Instances that left the route table with requests still in flight on them.
        self.retired: dict[str, Inst] = {}

    # -- route table --------------------------------------------------------------------
    def apply(self, table: RouteTable) -> None:
        """Take a new table. Counts, failures and ejections of known instances carry over.

        Requests waiting on a removed instance for an answer that has not started are cut
        loose and retried elsewhere: an instance leaves the table when its worker stopped
        heartbeating, and a machine that vanished (cable, power) answers nothing, not even a
        reset, so they would otherwise wait out the header timeout. Streams already passing
        bytes to the client finish (or break) on the instance."""
        models: dict[str, ModelState] = {}
        instances: dict[str, Inst] = {}
        for name, routes in table.models.items():
            m = self.models.get(name) or ModelState(name)
            insts = []
            for r in routes:
                slots = admission.process_share(r.max_concurrency, self.s.processes, self.process_index)
                inst = self.instances.get(r.id)
                if inst is None:
                    inst = Inst(r, m, slots)
                else:
                    inst.update(r, m, slots)
                insts.append(inst)
                instances[r.id] = inst
            gone = {i.id for i in m.instances} - {i.id for i in insts}
            m.instances = insts
            m.hold = name not in table.no_hold
            models[name] = m
            routing = table.routing.get(name, "p2c")
            if routing == "prefix" and m.prefixes is None:
                m.prefixes = prefix.PrefixIndex(self.s.prefix_index_blocks, self.s.prefix_ttl_s)
                log.info("model %s: prefix-aware routing", name)
            elif routing != "prefix" and m.prefixes is not None:
                m.prefixes = None
                log.info("model %s: routing %s", name, routing)
            elif m.prefixes is not None and gone:
                # Its cache went with it; a replacement must not inherit the belief.
                m.prefixes.forget({i.id for i in insts})
        for iid, inst in self.instances.items():
            if iid not in instances and inst.in_flight > 0:
                # Gone from the table with requests still on it (streams finish there): the
                # load report keeps saying so, or a drain would stop it under them.
                self.retired[iid] = inst
            if iid not in instances and inst.aborts:
                now = asyncio.get_running_loop().time()
                for scope in inst.aborts:
                    scope.reschedule(now)
        for name, gone in self.models.items():
            if name not in models:
                for w in gone.waiters:
                    if not w.fut.done():
                        w.fut.set_exception(NoInstance(f"model {name} was removed"))
                gone.waiters.clear()
        self.models, self.instances = models, instances
        self.loaded.set()
        for m in models.values():
            if m.waiters:
                self.drain(m)

    async def wait_loaded(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the first route table; True once there is one."""
        if not self.loaded.is_set() and timeout_s > 0:
            try:
                await asyncio.wait_for(self.loaded.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.loaded.is_set()

    # -- admission ----------------------------------------------------------------------
    def try_acquire(self, m: ModelState, exclude: tuple[str, ...] = (), session: bytes | None = None,
                    key: prefix.PrefixKey | None = None) -> Inst | balancer.Verdict:
        """``key``: the request's prompt key when ``m`` routes by prefix (else None)."""
        index = m.prefixes
        keyed = None
        if key is not None and index is not None:
            keyed = functools.partial(self._by_prefix, m, index, key)
        d = balancer.choose(m.instances, time.monotonic(), self.rng, exclude, session,
                            self.s.affinity_slack, self.s.affinity_ratio, keyed)
        if isinstance(d, Inst):
            d.in_flight += 1
            if key is not None and index is not None:
                index.record(key, d.id)
        return d

    def _by_prefix(self, m: ModelState, index: prefix.PrefixIndex, key: prefix.PrefixKey, room: list[Inst]) -> Inst:
        matched = index.matched(key, [c.id for c in room])
        inst, why = prefix.pick_why(room, matched, key.anchor, self.s.prefix_load_bound, self.s.prefix_load_slack)
        self.on_prefix(m.name, why)
        return inst

    async def acquire(self, m: ModelState, exclude: tuple[str, ...] = (), session: bytes | None = None,
                      wait_s: float | None = None, key: prefix.PrefixKey | None = None,
                      cold_wait_s: float | None = None) -> Inst:
        """A slot on an instance of ``m``: at once, or after queueing. Raises Overloaded or
        NoInstance. The caller must ``release`` the instance when done.

        A model with no routable instance at all (starting, replaced, scaled to zero) holds
        the request up to ``cold_wait_s`` (default the cold-start wait) for the first instance
        that becomes ready; it waits in the model's queue, so it counts in the load this
        gateway reports, which is what makes the autoscaler start a replica from zero."""
        d = self.try_acquire(m, exclude, session, key)
        if d.__class__ is Inst:
            return d  # type: ignore[return-value]
        if d is balancer.NO_INSTANCE:
            cold = self.s.cold_start_wait_s if cold_wait_s is None else min(cold_wait_s, self.s.cold_start_wait_s)
            if not m.hold or not admission.hold_for_cold_start(m.routable, len(exclude), cold):
                raise NoInstance(f"no healthy instance of model {m.name}")
            if not admission.queue_has_room(len(m.waiters), self.s.queue_len):
                raise NoInstance(f"model {m.name} has no ready instance and {len(m.waiters)} requests are "
                                 "already waiting for one to start", admission.cold_retry_after_s(cold))
            self.on_hold()
            inst = await self._wait(m, exclude, cold, cold=True)
        else:
            wait = self.s.queue_wait_s if wait_s is None else min(wait_s, self.s.queue_wait_s)
            if not admission.queue_has_room(len(m.waiters), self.s.queue_len) or wait <= 0:
                raise Overloaded(self.retry_after(m), f"model {m.name} is overloaded: every instance is busy "
                                                      f"and {len(m.waiters)} requests are queued")
            inst = await self._wait(m, exclude, wait)
        if key is not None and m.prefixes is not None:
            m.prefixes.record(key, inst.id)  # a queued request goes where a slot frees first
        return inst

    async def _wait(self, m: ModelState, exclude: tuple[str, ...], wait: float, cold: bool = False) -> Inst:
        loop = asyncio.get_running_loop()
        w = Waiter(loop.create_future(), exclude, cold)
        m.waiters.append(w)
        if cold:
            log.debug("request for %s held: no ready instance yet (up to %.0f s)", m.name, wait)

        def expire() -> None:
            if w.fut.done():
                return
            # The model object may have been replaced by a newer table: judge the current one.
            now_m = self.models.get(m.name, m)
            if cold and now_m.routable == 0:
                w.fut.set_exception(NoInstance(
                    f"no instance of model {m.name} became ready within {self.s.cold_start_wait_s:g} s (it is "
                    "starting, or cannot be placed: see `modelfleet models`)",
                    admission.cold_retry_after_s(self.s.cold_start_wait_s)))
            else:
                w.fut.set_exception(Overloaded(self.retry_after(m), f"model {m.name} is overloaded: no "
                                                                    f"instance freed up within {wait:g} s"))

        timer = loop.call_later(wait, expire)
        try:
            return await w.fut
        except asyncio.CancelledError:
            # Cancelled (client gone) just as a slot was handed over: give it back.
            if w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self.release(w.fut.result())
            raise
        finally:
            timer.cancel()
            if not w.fut.done():
                w.fut.cancel()
            try:
                m.waiters.remove(w)
            except ValueError:
                pass

    def release(self, inst: Inst) -> None:
        inst.in_flight -= 1
        if inst.in_flight <= 0 and self.retired.get(inst.id) is inst:
            del self.retired[inst.id]
        m = inst.model
        if m.waiters:
            self.drain(m)

    def drain(self, m: ModelState) -> None:
        """Hand free slots to queued requests, oldest first."""
        now = time.monotonic()
        for w in list(m.waiters):
            if w.fut.done():
                m.waiters.remove(w)
                continue
            d = balancer.choose(m.instances, now, self.rng, w.exclude)
            if d is balancer.ALL_FULL:
                if not w.exclude:
                    break  # nobody behind it can find room either
                continue
            if d is balancer.NO_INSTANCE and w.cold and m.routable == 0 and m.hold:
                continue  # still no instance up: keep holding it until one is, or its bound
            m.waiters.remove(w)
            if d is balancer.NO_INSTANCE:
                w.fut.set_exception(NoInstance(f"no healthy instance of model {m.name}"))
            else:
                assert isinstance(d, Inst)
                d.in_flight += 1
                w.fut.set_result(d)

    def retry_after(self, m: ModelState) -> int:
        return admission.retry_after_s(len(m.waiters), m.slots, m.latency_ewma or 1.0)

    # -- outcomes -----------------------------------------------------------------------
    def succeeded(self, inst: Inst, latency_s: float) -> None:
        inst.failures = 0
        inst.attempts += 1
        m = inst.model
        m.latency_ewma = admission.ewma(m.latency_ewma, latency_s)

    def failed(self, inst: Inst, reason: str) -> None:
        inst.failures += 1
        inst.attempts += 1
        inst.failed_attempts += 1
        now = time.monotonic()
        if inst.ejected(now) or not ejection.should_eject(inst.failures, self.s.eject_after):
            return
        s = self.s
        inst.ejections = ejection.ejections_after_quiet(
            inst.ejections, inst.last_ejected_at, now, s.eject_cooldown_s, s.eject_cooldown_max_s) + 1
        cooldown = ejection.cooldown_s(inst.ejections, s.eject_cooldown_s, s.eject_cooldown_max_s)
        inst.ejected_until = now + cooldown
        inst.last_ejected_at = now
        inst.failures = 0
        self.ejections_total += 1
        log.warning("instance %s (model %s, %s) ejected for %.1f s after %d consecutive failures: %s",
                    inst.id, inst.model.name, inst.endpoint, cooldown, s.eject_after, reason)
        self.report(inst.id, "ejected", f"{s.eject_after} consecutive failures, last: {reason}; "
                                        f"cooldown {cooldown:.1f} s")
        asyncio.get_running_loop().call_later(cooldown, self._restore, inst, inst.ejected_until)

    def _restore(self, inst: Inst, until: float) -> None:
        if inst.ejected_until != until:
            return  # superseded
        log.info("instance %s (model %s) restored after its cooldown", inst.id, inst.model.name)
        self.report(inst.id, "restored", "cooldown over")
        if self.instances.get(inst.id) is inst and inst.model.waiters:
            self.drain(inst.model)
