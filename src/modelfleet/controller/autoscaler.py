"""Replicas follow the load (issue 12): a pure decision over load history, and the loop that
feeds it on the lease holder.

``decide(policy, state, current, load, now)`` takes the deployment's policy, what the
autoscaler remembers of it (``ScaleState``: recent samples, since when the advice has said
"more" or "fewer", when a request was last seen), its current desired replicas, the
cluster-wide load of the model now (requests in flight plus queued, summed over every
gateway's unexpired report; None when no gateway reports at all) and the time. It returns a
``Decision`` (desired replicas, reason) and the new state. No I/O: tested on load traces
(tests/unit/test_autoscaler.py), like the scheduler.

Rules, after Ray Serve's ``target_ongoing_requests`` (docs/autoscaling.md has the why):
- advice = ceil(mean load over ``window_s`` / ``target_ongoing``), within [min, max];
- up: the advice must say "more" for ``up_delay_s`` (a burst scales up within seconds), then
  at most ``max_step`` replicas are added; a request waiting for a model at zero replicas
  starts one at once (it is held by the gateway: every second counts);
- down: the advice must say "fewer" for ``down_delay_s`` (a short lull does not scale
  down), then at most ``max_step`` are removed, never below max(min, 1);
- zero: with ``min_replicas`` 0, after ``idle_after_s`` without any load at all;
- no report from any gateway: hold (missing data never scales down, principle 10).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Gauge

from modelfleet.models import (
    AutoscalePolicy,
    AutoscaleStatus,
    Deployment,
    DeploymentSpec,
    InstanceState,
    LoadReport,
)
from modelfleet.store import Store, StoreError

log = logging.getLogger("modelfleet.controller")

DESIRED = Gauge(
    "modelfleet_model_desired_replicas", "Replicas the deployment asks for (autoscaled or fixed)", ["model"]
)
LOAD = Gauge("modelfleet_model_load", "Requests in flight plus queued, summed over every gateway's report", ["model"])
SMOOTHED = Gauge("modelfleet_model_load_smoothed", "The autoscaler's load over its window", ["model"])
REPORTS = Gauge("modelfleet_load_reports", "Unexpired gateway load reports the autoscaler read")


@dataclass
class ScaleState:
    """What the autoscaler remembers of one deployment between decisions."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (time, load)
    up_since: float | None = None  # the advice has said "more" since
    down_since: float | None = None  # the advice has said "fewer" since
    last_active: float | None = None  # last time any load was seen (None: since we started)
    started: float | None = None  # first decision of this controller for it


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    smoothed: float


def smoothed_load(samples: deque[tuple[float, float]], now: float, window_s: float) -> float:
    """Mean of the samples within ``window_s`` of ``now`` (0 when none)."""
    while samples and now - samples[0][0] > window_s:
        samples.popleft()
    if not samples:
        return 0.0
    return sum(x for _, x in samples) / len(samples)


def advice(policy: AutoscalePolicy, smoothed: float) -> int:
    """Replicas for ``smoothed`` load, within [max(min, 1), max]; 0 only through idleness."""
    want = math.ceil(smoothed / policy.target_ongoing - 1e-9) if smoothed > 0 else 0
    return max(max(policy.min_replicas, 1), min(policy.max_replicas, want))


def decide(
    policy: AutoscalePolicy,
    state: ScaleState,
    current: int,
    load: float | None,
    now: float,
    ready: int | None = None,
) -> Decision:
    """The desired replicas now; mutates ``state`` (samples, timers). ``ready``: replicas
    ready now (None: unknown); while replicas are wanted and none is ready yet (the model is
    loading) the time does not count as idle: nobody could have sent it a request."""
    if state.started is None:
        state.started = now
    if load is None:
        # Nobody reports: a gateway-less cluster, or the reports cannot be read. Hold.
        state.up_since = state.down_since = None
        return Decision(current, "no load report from any gateway: holding", 0.0)
    state.samples.append((now, load))
    smooth = smoothed_load(state.samples, now, policy.window_s)
    if load > 0 or (current > 0 and ready == 0):
        state.last_active = now
    lo, hi = policy.min_replicas, policy.max_replicas
    if current < lo or current > hi:  # a changed policy: into bounds at once
        state.up_since = state.down_since = None
        target = min(hi, max(lo, current))
        return Decision(target, f"policy bounds [{lo}, {hi}]", smooth)

    if current == 0:
        if load > 0:
            state.up_since = state.down_since = None
            return Decision(
                min(hi, max(1, advice(policy, smooth))),
                f"{load:g} request(s) waiting for a model at zero replicas",
                smooth,
            )
        return Decision(0, "idle at zero replicas", smooth)

    # Zero: nothing at all for idle_after_s (counted from this controller's first decision
    # when it has seen no load yet: a new leader does not stop replicas it knows nothing about).
    idle_since = state.last_active if state.last_active is not None else state.started
    if lo == 0 and load == 0 and smooth == 0 and now - idle_since >= policy.idle_after_s:
        state.up_since = state.down_since = None
        return Decision(0, f"no request for {now - idle_since:.0f} s (idle_after {policy.idle_after_s:g} s)", smooth)

    want = advice(policy, smooth)
    per = f"load {smooth:.2f} over {policy.window_s:g} s, target {policy.target_ongoing:g} per replica"
    if want > current:
        state.down_since = None
        if state.up_since is None:
            state.up_since = now
        if now - state.up_since >= policy.up_delay_s:
            state.up_since = None
            new = min(want, current + policy.max_step)
            return Decision(new, f"{per}: up {current} -> {new}", smooth)
        return Decision(current, f"{per}: {want} advised, waiting out the up delay", smooth)
    if want < current:
        state.up_since = None
        if state.down_since is None:
            state.down_since = now
        if now - state.down_since >= policy.down_delay_s:
            state.down_since = None
            new = max(want, current - policy.max_step)
            return Decision(new, f"{per}: down {current} -> {new}", smooth)
        return Decision(current, f"{per}: {want} advised, waiting out the down delay", smooth)
    state.up_since = state.down_since = None
    return Decision(current, f"{per}: steady", smooth)


def autoscaled_start(spec: DeploymentSpec) -> DeploymentSpec:
    """A new deployment's replicas within its policy's bounds (a deployment with min 0 starts
    warm, with its requested count, 1 by default, and goes to zero once idle); the status is
    the autoscaler's alone."""
    if spec.autoscale is None:
        return spec.model_copy(update={"autoscale_status": None})
    p = spec.autoscale
    return spec.model_copy(
        update={"replicas": min(p.max_replicas, max(p.min_replicas, spec.replicas)), "autoscale_status": None}
    )


def model_loads(reports: list[LoadReport]) -> dict[str, float]:
    """Cluster-wide load per model: in flight plus queued, summed over every report."""
    out: dict[str, float] = {}
    for r in reports:
        for name, m in r.models.items():
            out[name] = out.get(name, 0.0) + m.in_flight + m.queued
    return out


class Autoscaler:
    """The loop on the lease holder: every ``interval`` s, read the reports and the
    deployments, decide each autoscaled one, write what changed (``set_deployment_scale``);
    the reconciler reaches the new count on its next pass."""

    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store, self.interval = store, interval
        self.states: dict[str, ScaleState] = {}
        self.last: dict[str, tuple[int, str]] = {}  # model -> (desired, reason) last written

    async def run(self, token: int) -> None:
        log.info("autoscaler running (leader token %d)", token)
        self.states.clear()  # a new term: what another leader saw is not ours to trust
        while True:
            try:
                await self.once()
            except StoreError as exc:
                log.warning("autoscaler pass skipped: store unavailable: %s", exc)
            await asyncio.sleep(self.interval)

    async def once(self, now: float | None = None) -> dict[str, Decision]:
        deployments, reports, instances = await asyncio.gather(
            self.store.list_deployments(), self.store.list_load_reports(), self.store.list_instances()
        )
        ready: dict[str, int] = {}
        for i in instances:
            if i.state == InstanceState.READY and i.enabled:
                ready[i.model] = ready.get(i.model, 0) + 1
        now = time.monotonic() if now is None else now
        REPORTS.set(len(reports))
        loads = model_loads(reports)
        names = {d.name for d in deployments}
        self.states = {k: v for k, v in self.states.items() if k in names}
        out: dict[str, Decision] = {}
        for d in deployments:
            DESIRED.labels(d.name).set(d.replicas)
            LOAD.labels(d.name).set(loads.get(d.name, 0.0))
            if d.autoscale is None:
                self.states.pop(d.name, None)
                continue
            out[d.name] = await self._one(d, loads.get(d.name, 0.0) if reports else None, now, ready.get(d.name, 0))
        return out

    async def _one(self, d: Deployment, load: float | None, now: float, ready: int) -> Decision:
        assert d.autoscale is not None
        state = self.states.setdefault(d.name, ScaleState())
        dec = decide(d.autoscale, state, d.replicas, load, now, ready)
        SMOOTHED.labels(d.name).set(dec.smoothed)
        changed = dec.desired != d.replicas
        prev = d.autoscale_status
        # Written when the count changes (and once at first): `modelfleet models` shows the
        # last decision and its reason; a write per second to say "steady" would be noise.
        if changed or prev is None:
            status = AutoscaleStatus(
                desired=dec.desired, load=round(dec.smoothed, 3), reason=dec.reason, at=time.time()
            )
            if await self.store.set_deployment_scale(d.name, dec.desired, status):
                if changed:
                    log.info("autoscaler: %s %d -> %d replicas: %s", d.name, d.replicas, dec.desired, dec.reason)
                DESIRED.labels(d.name).set(dec.desired)
        return dec
