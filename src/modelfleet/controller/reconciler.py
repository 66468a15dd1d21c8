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
  once; they are stopped when every gateway reports them out of rotation with nothing in
  flight (``drained_idle``, from the load reports), or after ``drain_timeout`` at the latest;
- scale-down drains the replicas it removes (ready ones: gateways stop sending them new
  requests, and they stop once idle), so no request in flight is cut; a replica that never
  became routable (pending, starting, failed) is removed at once;
- replicas that fit nowhere stay pending with the reason, and are retried every pass;
- a failure stays with the deployment that caused it: an exception while planning or writing
  one deployment (a value the store refuses, a source the controller cannot look at) is caught,
  recorded on that deployment (``Deployment.error``: the deployments API and
  ``modelfleet models`` show it; one log line when it starts, changes or ends) and every
  other deployment goes on being placed. Only a store outage stops the whole pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from modelfleet.controller.scheduler import (
    Capacity,
    Need,
    Placed,
    capacities,
    commit,
    deployment_need,
    place_replica,
)
from modelfleet.models import (
    DEPLOYMENT_NAME_MAX_LEN,
    ID_MAX_LEN,
    Deployment,
    Instance,
    InstanceSpec,
    InstanceState,
    LoadReport,
    WorkerRecord,
)
from modelfleet.store import Store, StoreError, StoreUnavailable

log = logging.getLogger("modelfleet.controller")

RECONCILER_HELD = Gauge("modelfleet_reconciler_held", "1 while moves are held (most workers silent at once)")
RECONCILER_MOVES = Counter("modelfleet_reconciler_moves_total", "Replicas moved off silent workers")
RECONCILER_ACTIONS = Counter("modelfleet_reconciler_actions_total", "Reconciler writes", ["action"])
RECONCILER_FAILING = Gauge("modelfleet_reconciler_failing_deployments",
                           "Deployments the reconciler cannot act on (their error says why)")

ROUTABLE = (InstanceState.READY, InstanceState.DRAINING)  # what a gateway may have sent requests to
GPU_PARAM = "gpus"  # GPU indexes chosen for a replica; the worker exports CUDA_VISIBLE_DEVICES from it


@dataclass
class Plan:
    create: list[InstanceSpec] = field(default_factory=list)
    place: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # id, worker, gpus
    pending: list[tuple[str, str]] = field(default_factory=list)  # id, reason (changed reasons only)
    delete: list[tuple[str, str]] = field(default_factory=list)  # id, why
    drain: list[tuple[str, str]] = field(default_factory=list)  # id, why: out of rotation, stopped once idle
    moved: int = 0
    held: str | None = None
    owner: dict[str, str] = field(default_factory=dict)  # instance id -> deployment, for every action
    failed: dict[str, str] = field(default_factory=dict)  # deployment -> why it could not be planned


def failure_reason(exc: BaseException) -> str:
    """One line for a deployment's error: the exception's own words, never a traceback."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or exc.title
        return f"{where}: {first.get('msg')}"[:500]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:500]


def panic_hold(workers: list[WorkerRecord], ttl: float) -> str | None:
    """Hold moves when more than half of the workers (of at least two) are silent at once."""
    silent = sum(1 for w in workers if w.heartbeat_age >= ttl)
    if len(workers) >= 2 and silent * 2 > len(workers):
        return f"{silent} of {len(workers)} workers silent at once: holding moves (network or store fault?)"
    return None


def new_replica(d: Deployment) -> InstanceSpec:
    if len(d.name) > DEPLOYMENT_NAME_MAX_LEN:
        # Written before the API checked it (or straight into the store).
        raise ValueError(f"deployment name is {len(d.name)} characters: its replica ids (NAME-xxxxxxxx) would "
                         f"exceed {ID_MAX_LEN}; at most {DEPLOYMENT_NAME_MAX_LEN} fit")
    return InstanceSpec(
        id=f"{d.name}-{uuid.uuid4().hex[:8]}", model=d.name, deployment=d.name, backend=d.backend, source=d.source,
        params=dict(d.params), weight=d.weight, max_concurrency=d.max_concurrency,
    )


def extra_order(i: Instance) -> tuple[int, str]:
    """Which replicas go first on scale-down: unplaced, failed, starting, then ready (newest id last)."""
    rank = {None: 0}.get(i.worker_id, 1)
    state_rank = {InstanceState.FAILED: 1, InstanceState.PENDING: 2, InstanceState.DOWNLOADING: 3,
                  InstanceState.STARTING: 3}.get(i.state, 4)
    return (rank * 10 + state_rank, i.id)


def draining(i: Instance) -> bool:
    """Out of rotation: drained by an operator or a scale-down (disabled), or by its worker
    shutting down (state draining). It does not count toward replicas."""
    return not i.enabled or i.state == InstanceState.DRAINING


def drained_idle(instance_id: str, reports: list[LoadReport], at_revision: int) -> bool:
    """Every gateway has it out of rotation with nothing in flight: it may stop.

    Only reports of a route table at least as new as ``at_revision`` (the revision when the
    drain was first seen: its table has the replica disabled) count, and there must be at
    least one: with no gateway reporting, the drain timeout decides."""
    if not reports:
        return False
    for r in reports:
        if r.revision < at_revision:
            return False
        x = r.instances.get(instance_id)
        if x is not None and (x.enabled or x.in_flight > 0):
            return False
    return True


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
    idle: Collection[str] = (),
    min_drain: float = 0.0,
) -> Plan:
    plan = Plan(held=panic_hold(workers, ttl))
    by_name = {d.name: d for d in deployments}
    ages = {w.id: w.heartbeat_age for w in workers}
    alive = {w.id for w in workers if w.heartbeat_age < ttl}
    needs_by_dep: dict[str, Need] = {}
    for d in deployments:
        try:
            needs_by_dep[d.name] = deployment_need(d)
        except Exception as exc:  # one deployment's problem, not the cluster's
            plan.failed[d.name] = failure_reason(exc)
    needs: dict[str, Need] = {i.id: needs_by_dep[i.deployment] for i in instances if i.deployment in needs_by_dep}
    caps = {c.worker_id: c for c in capacities(workers, alive, instances, needs)}
    budget = move_budget

    for inst in instances:
        if inst.deployment is not None and inst.deployment not in by_name:
            plan.delete.append((inst.id, f"deployment {inst.deployment} was deleted"))
            plan.owner[inst.id] = inst.deployment

    for d in deployments:
        if d.name in plan.failed:
            continue
        mine = [i for i in instances if i.deployment == d.name]
        part = Plan()
        try:
            budget = _plan_deployment(part, d, mine, needs_by_dep[d.name], caps, ages, grace=grace,
                                      budget=budget, held=plan.held is not None, drained_since=drained_since,
                                      drain_timeout=drain_timeout, now=now, idle=idle, min_drain=min_drain)
        except Exception as exc:  # nothing of this deployment is done this pass; the others go on
            plan.failed[d.name] = failure_reason(exc)
            continue
        plan.create += part.create
        plan.place += part.place
        plan.pending += part.pending
        plan.delete += part.delete
        plan.drain += part.drain
        plan.moved += part.moved
        for iid in [s.id for s in part.create] + [x[0] for x in part.place + part.pending + part.delete + part.drain]:
            plan.owner[iid] = d.name
    return plan


def _plan_deployment(plan: Plan, d: Deployment, mine: list[Instance], need: Need, caps: dict[str, Capacity],
                     ages: dict[str, float], *, grace: float, budget: int, held: bool,
                     drained_since: dict[str, float], drain_timeout: float, now: float,
                     idle: Collection[str] = (), min_drain: float = 0.0) -> int:
    """One deployment's part of the plan; returns the move budget left."""
    keep: list[Instance] = []
    for i in mine:
        lost = i.worker_id is not None and ages.get(i.worker_id, float("inf")) >= grace
        if lost and not held and budget > 0:
            budget -= 1
            plan.moved += 1
            plan.delete.append((i.id, f"worker {i.worker_id} silent for more than {grace:.0f} s: moving"))
            continue
        if draining(i):
            since = drained_since.get(i.id, now)
            if i.id in idle and now - since >= min_drain:
                plan.delete.append((i.id, "drained: out of rotation and idle at every gateway"))
            elif i.state not in ROUTABLE or i.worker_id is None:
                plan.delete.append((i.id, "drained: never took requests"))
            elif now - since >= drain_timeout:
                plan.delete.append((i.id, f"drained for {drain_timeout:.0f} s"))
            continue  # draining replicas do not count
        keep.append(i)

    if len(keep) > d.replicas:
        for i in sorted(keep, key=extra_order)[: len(keep) - d.replicas]:
            if i.state in ROUTABLE and i.worker_id is not None:
                plan.drain.append((i.id, f"scaled to {d.replicas}"))  # may have requests in flight
            else:
                plan.delete.append((i.id, f"scaled to {d.replicas}"))
            keep.remove(i)

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
    return budget


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
                 drain_timeout: float = 30.0, interval: float = 1.0, min_drain: float = 5.0) -> None:
        self.store = store
        # A replica an operator drained stays listed (draining) at least this long, even when
        # idle at once: the operator and the console see the drain happen. A scale-down's
        # drains stop as soon as they are idle (replica-seconds are what autoscaling saves).
        self.min_drain = min_drain
        self.scaled_down: set[str] = set()  # drains this reconciler started (scale-down)
        self.ttl, self.grace, self.drain_timeout, self.interval = ttl, max(grace, ttl), drain_timeout, interval
        self.limiter = MoveLimiter(moves_per_minute)
        self.drained_since: dict[str, float] = {}
        self.drained_at_rev: dict[str, int] = {}  # the store revision when a drain was first seen
        self._held: str | None = None
        self.failing: dict[str, str] = {}  # deployment -> error, as last logged

    async def run(self, token: int) -> None:
        log.info("reconciler running (leader token %d, grace %.0f s)", token, self.grace)
        while True:
            try:
                await self.reconcile_once()
            except StoreError as exc:
                log.warning("reconcile pass skipped: store unavailable: %s", exc)
            await asyncio.sleep(self.interval)

    async def reconcile_once(self) -> Plan:
        deployments, instances, workers, reports = await asyncio.gather(
            self.store.list_deployments(), self.store.list_instances(), self.store.list_workers(),
            self.store.list_load_reports(),
        )
        # After the reads: at least the revision of every disable they show (the disable and
        # its bump are one write), so a gateway at this revision has the replica disabled.
        revision = await self.store.get_revision()
        now = time.monotonic()
        disabled = {i.id for i in instances if draining(i)}
        self.drained_since = {k: v for k, v in self.drained_since.items() if k in disabled}
        self.drained_at_rev = {k: v for k, v in self.drained_at_rev.items() if k in disabled}
        for iid in disabled:
            self.drained_since.setdefault(iid, now)
            self.drained_at_rev.setdefault(iid, revision)
        self.scaled_down &= disabled
        idle = {iid for iid in disabled if drained_idle(iid, reports, self.drained_at_rev[iid])
                and (iid in self.scaled_down or now - self.drained_since[iid] >= self.min_drain)}
        plan = plan_reconcile(
            deployments, instances, workers, ttl=self.ttl, grace=self.grace,
            move_budget=self.limiter.budget(now), drained_since=self.drained_since,
            drain_timeout=self.drain_timeout, now=now, idle=idle,
        )
        self._report_hold(plan.held)
        failed = await self.apply(plan, now)
        await self.record_failures(deployments, failed)
        return plan

    async def record_failures(self, deployments: list[Deployment], failed: dict[str, str]) -> None:
        """Each deployment's error in the store (written only when it differs from what is
        there), and one log line when a deployment starts failing, fails differently, or recovers."""
        for d in deployments:
            error = failed.get(d.name)
            was = self.failing.get(d.name)
            if error != was:
                if error:
                    log.warning("deployment %s cannot be reconciled (the others go on): %s", d.name, error)
                else:
                    log.info("deployment %s reconciled again", d.name)
            if d.error != error:
                try:
                    await self.store.set_deployment_error(d.name, error)
                except StoreUnavailable:
                    raise
                except StoreError as exc:
                    log.debug("could not record the error of deployment %s: %s", d.name, exc)
        names = {d.name for d in deployments}
        self.failing = {n: e for n, e in failed.items() if n in names}
        RECONCILER_FAILING.set(len(self.failing))

    def _report_hold(self, held: str | None) -> None:
        if held != self._held:
            if held:
                log.warning("reconciler: %s", held)
            else:
                log.info("reconciler: moves resumed")
        self._held = held
        RECONCILER_HELD.set(1 if held else 0)

    async def apply(self, plan: Plan, now: float) -> dict[str, str]:
        """Write the plan. A write that fails for any reason but a store outage marks its
        deployment failed and skips the rest of that deployment's writes; the others go on.
        Returns every failed deployment with its reason."""
        failed = dict(plan.failed)

        async def act(iid: str, what: str, write: Callable[[], Awaitable[None]]) -> bool:
            owner = plan.owner.get(iid, "")
            if owner in failed:
                return False
            try:
                await write()
                return True
            except StoreUnavailable:
                raise
            except Exception as exc:
                # No random id in the reason (a new replica's): the same failure must read the
                # same on every pass, or it would be logged and written again each time.
                failed[owner] = f"{what}: {failure_reason(exc)}"
                return False

        for iid, why in plan.delete:
            async def delete(iid: str = iid, why: str = why) -> None:
                if await self.store.delete_instance(iid):
                    RECONCILER_ACTIONS.labels("delete").inc()
                    log.info("instance %s removed: %s", iid, why)

            await act(iid, f"removing instance {iid}", delete)
        for iid, why in plan.drain:
            async def drain(iid: str = iid, why: str = why) -> None:
                if await self.store.update_instance(iid, enabled=False):
                    self.scaled_down.add(iid)
                    RECONCILER_ACTIONS.labels("drain").inc()
                    log.info("instance %s draining (no new requests; stopped once idle): %s", iid, why)

            await act(iid, f"draining instance {iid}", drain)
        if plan.moved:
            self.limiter.spend(plan.moved, now)
            RECONCILER_MOVES.inc(plan.moved)
        for spec in plan.create:
            async def create(spec: InstanceSpec = spec) -> None:
                await self.store.create_instance(spec)
                RECONCILER_ACTIONS.labels("create").inc()
                where = f"on worker {spec.worker_id}" if spec.worker_id else f"pending: {spec.pending_reason}"
                log.info("instance %s of %s created %s", spec.id, spec.model, where)

            await act(spec.id, "creating a replica", create)
        for iid, worker_id, gpus in plan.place:
            async def place(iid: str = iid, worker_id: str = worker_id, gpus: tuple[int, ...] = gpus) -> None:
                inst = await self.store.get_instance(iid)
                params = dict(inst.params) if inst else {}
                if gpus:
                    params[GPU_PARAM] = list(gpus)
                await self.store.update_instance(iid, worker_id=worker_id, pending_reason=None, params=params)
                RECONCILER_ACTIONS.labels("place").inc()
                log.info("instance %s placed on worker %s", iid, worker_id)

            await act(iid, f"placing instance {iid}", place)
        for iid, reason in plan.pending:
            async def pending(iid: str = iid, reason: str = reason) -> None:
                await self.store.update_instance(iid, pending_reason=reason)
                log.info("instance %s pending: %s", iid, reason)

            await act(iid, f"updating instance {iid}", pending)
        return failed
