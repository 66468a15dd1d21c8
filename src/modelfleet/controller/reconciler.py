"""Converge observed state to desired state (lease holder only).

``plan_reconcile`` is pure: it takes deployments, instances and workers and returns what
to create, place, delete and why; ``Reconciler.run`` reads the store, plans, and writes.

Rules:
- a replica whose worker has been silent longer than ``grace`` is moved: its instance row
  is deleted (so the worker, if it comes back, stops that runner: it is no longer in its
  assignments) and a new replica is placed elsewhere;
- moves are rate-limited (``moves_per_minute``) and held altogether while more than half of
  the workers are silent at once: that is a network or store fault, not dead machines;
- draining (disabled) replicas do not count toward ``replicas``, so a replacement starts at
  once; they are stopped after ``drain_timeout``;
- replicas that fit nowhere stay pending with the reason, and are retried every pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from modelfleet.controller.scheduler import (
    Capacity,
    Need,
    Placed,
    capacities,
    commit,
    deployment_need,
    place_replica,
)
from modelfleet.models import Deployment, Instance, InstanceSpec, InstanceState, WorkerRecord
from modelfleet.store import Store, StoreError

log = logging.getLogger("modelfleet.controller")

RECONCILER_HELD = Gauge("modelfleet_reconciler_held", "1 while moves are held (most workers silent at once)")
RECONCILER_MOVES = Counter("modelfleet_reconciler_moves_total", "Replicas moved off silent workers")
RECONCILER_ACTIONS = Counter("modelfleet_reconciler_actions_total", "Reconciler writes", ["action"])

GPU_PARAM = "gpus"  # GPU indexes chosen for a replica; the worker exports CUDA_VISIBLE_DEVICES from it


@dataclass
class Plan:
    create: list[InstanceSpec] = field(default_factory=list)
    place: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # id, worker, gpus
    pending: list[tuple[str, str]] = field(default_factory=list)  # id, reason (changed reasons only)
    delete: list[tuple[str, str]] = field(default_factory=list)  # id, why
    moved: int = 0
    held: str | None = None


def panic_hold(workers: list[WorkerRecord], ttl: float) -> str | None:
    """Hold moves when more than half of the workers (of at least two) are silent at once."""
    silent = sum(1 for w in workers if w.heartbeat_age >= ttl)
    if len(workers) >= 2 and silent * 2 > len(workers):
        return f"{silent} of {len(workers)} workers silent at once: holding moves (network or store fault?)"
    return None


def new_replica(d: Deployment) -> InstanceSpec:
    return InstanceSpec(
        id=f"{d.name}-{uuid.uuid4().hex[:8]}", model=d.name, deployment=d.name, backend=d.backend, source=d.source,
        params=dict(d.params), weight=d.weight, max_concurrency=d.max_concurrency,
    )


def extra_order(i: Instance) -> tuple[int, str]:
    """Which replicas go first on scale-down: unplaced, failed, starting, then ready (newest id last)."""
    rank = {None: 0}.get(i.worker_id, 1)
    state_rank = {InstanceState.FAILED: 1, InstanceState.PENDING: 2, InstanceState.STARTING: 3}.get(i.state, 4)
    return (rank * 10 + state_rank, i.id)


def plan_reconcile(
    deployments: list[Deployment],
    instances: list[Instance],
    workers: list[WorkerRecord],
    *,
    ttl: float,
    grace: float,
    move_budget: int,
    drained_since: dict[str, float],
    drain_timeout: float,
    now: float,
) -> Plan:
    plan = Plan(held=panic_hold(workers, ttl))
    by_name = {d.name: d for d in deployments}
    ages = {w.id: w.heartbeat_age for w in workers}
    alive = {w.id for w in workers if w.heartbeat_age < ttl}
    needs_by_dep = {d.name: deployment_need(d) for d in deployments}
    needs: dict[str, Need] = {i.id: needs_by_dep[i.deployment] for i in instances if i.deployment in needs_by_dep}
    caps = {c.worker_id: c for c in capacities(workers, alive, instances, needs)}
    budget = move_budget

    for inst in instances:
        if inst.deployment is not None and inst.deployment not in by_name:
            plan.delete.append((inst.id, f"deployment {inst.deployment} was deleted"))

    for d in deployments:
        mine = [i for i in instances if i.deployment == d.name]
        keep: list[Instance] = []
        for i in mine:
            lost = i.worker_id is not None and ages.get(i.worker_id, float("inf")) >= grace
            if lost and plan.held is None and budget > 0:
                budget -= 1
                plan.moved += 1
                plan.delete.append((i.id, f"worker {i.worker_id} silent for more than {grace:.0f} s: moving"))
                continue
            if not i.enabled:
                since = drained_since.get(i.id, now)
                if now - since >= drain_timeout:
                    plan.delete.append((i.id, f"drained for {drain_timeout:.0f} s"))
                continue  # draining replicas do not count
            keep.append(i)

        if len(keep) > d.replicas:
            for i in sorted(keep, key=extra_order)[: len(keep) - d.replicas]:
                plan.delete.append((i.id, f"scaled to {d.replicas}"))
                keep.remove(i)

        need = needs_by_dep[d.name]
        for i in keep:
            if i.worker_id is None:
                _place(plan, i.id, i.pending_reason, d, need, caps)
        for _ in range(d.replicas - len(keep)):
            spec = new_replica(d)
            result = place_replica(d.name, need, d.placement, list(caps.values()))
            # The worker subtracts declared needs from its resource report.
            spec.params.setdefault("memory", need.memory)
            if need.gpu_memory:
                spec.params.setdefault("gpu_memory", need.gpu_memory)
            if isinstance(result, Placed):
                commit(caps[result.worker_id], d.name, need, result.gpu_indexes)
                spec.worker_id = result.worker_id
                if result.gpu_indexes:
                    spec.params[GPU_PARAM] = list(result.gpu_indexes)
            else:
                spec.pending_reason = result.reason
            plan.create.append(spec)
    return plan


def _place(plan: Plan, instance_id: str, old_reason: str | None, d: Deployment, need: Need,
           caps: dict[str, Capacity]) -> None:
    result = place_replica(d.name, need, d.placement, list(caps.values()))
    if isinstance(result, Placed):
        commit(caps[result.worker_id], d.name, need, result.gpu_indexes)
        plan.place.append((instance_id, result.worker_id, result.gpu_indexes))
    elif result.reason != old_reason:
        plan.pending.append((instance_id, result.reason))


class MoveLimiter:
    """At most ``per_minute`` moves in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.moves: deque[float] = deque()

    def budget(self, now: float) -> int:
        while self.moves and now - self.moves[0] >= 60:
            self.moves.popleft()
        return max(0, self.per_minute - len(self.moves))

    def spend(self, n: int, now: float) -> None:
        self.moves.extend([now] * n)


class Reconciler:
    def __init__(self, store: Store, *, ttl: float, grace: float, moves_per_minute: int,
                 drain_timeout: float = 30.0, interval: float = 1.0) -> None:
        self.store = store
        self.ttl, self.grace, self.drain_timeout, self.interval = ttl, max(grace, ttl), drain_timeout, interval
        self.limiter = MoveLimiter(moves_per_minute)
        self.drained_since: dict[str, float] = {}
        self._held: str | None = None

    async def run(self, token: int) -> None:
        log.info("reconciler running (leader token %d, grace %.0f s)", token, self.grace)
        while True:
            try:
                await self.reconcile_once()
            except StoreError as exc:
                log.warning("reconcile pass skipped: store unavailable: %s", exc)
            await asyncio.sleep(self.interval)

    async def reconcile_once(self) -> Plan:
        deployments, instances, workers = await asyncio.gather(
            self.store.list_deployments(), self.store.list_instances(), self.store.list_workers()
        )
        now = time.monotonic()
        disabled = {i.id for i in instances if not i.enabled}
        self.drained_since = {k: v for k, v in self.drained_since.items() if k in disabled}
        for iid in disabled:
            self.drained_since.setdefault(iid, now)
        plan = plan_reconcile(
            deployments, instances, workers, ttl=self.ttl, grace=self.grace,
            move_budget=self.limiter.budget(now), drained_since=self.drained_since,
            drain_timeout=self.drain_timeout, now=now,
        )
        self._report_hold(plan.held)
        await self.apply(plan, now)
        return plan

    def _report_hold(self, held: str | None) -> None:
        if held != self._held:
            if held:
                log.warning("reconciler: %s", held)
            else:
                log.info("reconciler: moves resumed")
        self._held = held
        RECONCILER_HELD.set(1 if held else 0)

    async def apply(self, plan: Plan, now: float) -> None:
        for iid, why in plan.delete:
            if await self.store.delete_instance(iid):
                RECONCILER_ACTIONS.labels("delete").inc()
                log.info("instance %s removed: %s", iid, why)
        if plan.moved:
            self.limiter.spend(plan.moved, now)
            RECONCILER_MOVES.inc(plan.moved)
        for spec in plan.create:
            await self.store.create_instance(spec)
            RECONCILER_ACTIONS.labels("create").inc()
            where = f"on worker {spec.worker_id}" if spec.worker_id else f"pending: {spec.pending_reason}"
            log.info("instance %s of %s created %s", spec.id, spec.model, where)
        for iid, worker_id, gpus in plan.place:
            inst = await self.store.get_instance(iid)
            params = dict(inst.params) if inst else {}
            if gpus:
                params[GPU_PARAM] = list(gpus)
            await self.store.update_instance(iid, worker_id=worker_id, pending_reason=None, params=params)
            RECONCILER_ACTIONS.labels("place").inc()
            log.info("instance %s placed on worker %s", iid, worker_id)
        for iid, reason in plan.pending:
            await self.store.update_instance(iid, pending_reason=reason)
            log.info("instance %s pending: %s", iid, reason)
