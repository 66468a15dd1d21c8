"""Reconciliation decisions without sockets: moves, panic hold, rate limit, scaling, draining."""

from __future__ import annotations

import logging

from modelfleet.controller.reconciler import MoveLimiter, Reconciler, panic_hold, plan_reconcile
from modelfleet.models import Deployment, Instance, InstanceState, Resources, WorkerInfo
from modelfleet.store import StoreError
from modelfleet.store.memory import MemoryStore
from tests.unit.test_scheduler import worker

TTL, GRACE = 6.0, 30.0


def dep(name: str = "chat", replicas: int = 2, **kw) -> Deployment:
    return Deployment(name=name, backend="openai", source="http://x", replicas=replicas, **kw)


def inst(iid: str, worker_id: str | None, *, dep_name: str = "chat", state=InstanceState.READY,
         enabled: bool = True) -> Instance:
    return Instance(id=iid, model=dep_name, deployment=dep_name, worker_id=worker_id, state=state, enabled=enabled)


def plan(deps, insts, workers, budget: int = 10, drained=None, now: float = 100.0):
    return plan_reconcile(deps, insts, workers, ttl=TTL, grace=GRACE, move_budget=budget,
                          drained_since=drained or {}, drain_timeout=30.0, now=now)


def test_missing_replicas_are_created_and_spread():
    p = plan([dep(replicas=2)], [], [worker("a"), worker("b")])
    assert sorted(s.worker_id for s in p.create) == ["a", "b"]
    assert all(s.deployment == "chat" and s.model == "chat" for s in p.create)


def test_replica_of_worker_silent_past_grace_is_moved():
    workers = [worker("a"), worker("b"), worker("c", age=GRACE + 1)]
    p = plan([dep(replicas=2)], [inst("i1", "a"), inst("i2", "c")], workers)
    assert p.delete == [("i2", "worker c silent for more than 30 s: moving")]
    assert [s.worker_id for s in p.create] == ["b"]  # spread: not on a, which has one
    assert p.moved == 1 and p.held is None


def test_worker_silent_less_than_grace_keeps_its_replica():
    p = plan([dep(replicas=2)], [inst("i1", "a"), inst("i2", "b")], [worker("a"), worker("b", age=TTL + 1)])
    assert p.delete == [] and p.create == []


def test_panic_hold_when_most_workers_silent():
    workers = [worker("a", age=GRACE + 5), worker("b", age=GRACE + 5), worker("c")]
    p = plan([dep(replicas=2)], [inst("i1", "a"), inst("i2", "b")], workers)
    assert p.held and "2 of 3 workers silent" in p.held
    assert p.delete == [] and p.create == []


def test_panic_needs_more_than_half():
    assert panic_hold([worker("a", age=GRACE + 1), worker("b")], TTL) is None
    assert panic_hold([worker("a", age=GRACE + 1), worker("b", age=GRACE + 1)], TTL) is not None
    assert panic_hold([worker("a", age=GRACE + 1)], TTL) is None  # a single worker is just dead


def test_move_budget_limits_moves():
    workers = [worker(f"ok{i}") for i in range(6)] + [worker(f"dead{i}", age=GRACE + 1) for i in range(4)]
    insts = [inst(f"i{i}", f"dead{i}") for i in range(4)]
    p = plan([dep(replicas=4)], insts, workers, budget=1)
    assert p.moved == 1 and len(p.delete) == 1 and len(p.create) == 1


def test_move_limiter_sliding_minute():
    lim = MoveLimiter(3)
    assert lim.budget(0) == 3
    lim.spend(3, 0)
    assert lim.budget(59) == 0
    assert lim.budget(60) == 3


def test_scale_down_removes_unplaced_and_failed_first():
    insts = [inst("a-ready", "a"), inst("b-failed", "b", state=InstanceState.FAILED), inst("pending", None)]
    p = plan([dep(replicas=1)], insts, [worker("a"), worker("b")])
    assert {i for i, _ in p.delete} == {"pending", "b-failed"}
    assert p.create == []


def test_deleted_deployment_removes_its_instances():
    p = plan([], [inst("i1", "a")], [worker("a")])
    assert p.delete == [("i1", "deployment chat was deleted")]


def test_unplaceable_replica_is_pending_with_reason():
    p = plan([dep(replicas=1, placement={"labels": {"gpu": "yes"}})], [], [worker("a")])
    (spec,) = p.create
    assert spec.worker_id is None and "labels gpu=yes not matched" in spec.pending_reason


def test_pending_replica_placed_when_a_worker_fits():
    d = dep(replicas=1, placement={"labels": {"gpu": "yes"}})
    p = plan([d], [inst("i1", None)], [worker("g", labels={"gpu": "yes"})])
    assert p.place == [("i1", "g", ())] and p.create == []


def test_drained_replica_replaced_now_and_stopped_after_timeout():
    insts = [inst("old", "a", enabled=False), inst("b1", "b")]
    p = plan([dep(replicas=2)], insts, [worker("a"), worker("b")], drained={"old": 90.0}, now=100.0)
    assert len(p.create) == 1 and p.delete == []
    p = plan([dep(replicas=2)], insts, [worker("a"), worker("b")], drained={"old": 60.0}, now=100.0)
    assert ("old", "drained for 30 s") in p.delete


def test_declared_instances_are_left_alone():
    declared = Instance(id="w/m", model="m", deployment=None, worker_id="a")
    p = plan([], [declared], [worker("a")])
    assert p.delete == [] and p.create == []


# -- a failure stays with its deployment ----------------------------------------------------------
def test_a_deployment_that_cannot_be_planned_does_not_stop_the_others():
    poison = dep(name="p" * 200, replicas=1)  # its replica ids would not fit the 128-character id column
    p = plan([poison, dep(name="good", replicas=2)], [], [worker("a"), worker("b")])
    assert sorted(s.worker_id for s in p.create) == ["a", "b"] and {s.deployment for s in p.create} == {"good"}
    assert set(p.failed) == {poison.name} and "replica ids" in p.failed[poison.name]
    assert all(p.owner[s.id] == "good" for s in p.create)


class RefusingStore(MemoryStore):
    """A store that refuses the rows of one deployment, as a SQL store refuses a value its
    column cannot hold (failure injection: the only way to get it from the memory store)."""

    async def create_instance(self, spec):
        if spec.deployment == "bad":
            raise StoreError("DataError: integer out of range")
        return await super().create_instance(spec)


async def test_a_write_the_store_refuses_stays_with_its_deployment(caplog):
    store = RefusingStore()
    await store.heartbeat(WorkerInfo(id="a", name="a", address="h", port=1,
                                     resources=Resources(cpu_cores=8, memory_total=64 << 30)))
    for name in ("bad", "good"):
        await store.put_deployment(dep(name=name, replicas=2))
    r = Reconciler(store, ttl=TTL, grace=GRACE, moves_per_minute=10)
    with caplog.at_level(logging.INFO, logger="modelfleet.controller"):
        for _ in range(3):
            await r.reconcile_once()
    assert [i.deployment for i in await store.list_instances()] == ["good", "good"]
    bad, good = await store.get_deployment("bad"), await store.get_deployment("good")
    assert bad.error and bad.error == "creating a replica: DataError: integer out of range"
    assert good.error is None
    lines = [r.getMessage() for r in caplog.records if "cannot be reconciled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("deployment bad cannot be reconciled"), lines  # once, not per pass

    # Fixed by its operator: the error clears on the next pass, with one line saying so.
    await store.put_deployment(dep(name="bad", replicas=0))
    with caplog.at_level(logging.INFO, logger="modelfleet.controller"):
        await r.reconcile_once()
    assert (await store.get_deployment("bad")).error is None
    assert any(r.getMessage() == "deployment bad reconciled again" for r in caplog.records)


def test_scale_down_drains_ready_replicas_and_stops_them_once_idle_at_every_gateway():
    from modelfleet.controller.reconciler import drained_idle
    from modelfleet.models import InstanceLoad, LoadReport

    insts = [inst("a1", "a"), inst("b1", "b"), inst("c-start", "a", state=InstanceState.STARTING)]
    p = plan([dep(replicas=1)], insts, [worker("a"), worker("b")])
    # The one still starting goes at once (no gateway routes to it); a ready one is drained.
    assert p.delete == [("c-start", "scaled to 1")]
    assert p.drain == [("a1", "scaled to 1")]  # ready ones by id: the first goes
    drained = [inst("a1", "a", enabled=False), inst("b1", "b")]
    busy = [LoadReport(source="g1", revision=10, instances={"a1": InstanceLoad(in_flight=1, enabled=False)}),
            LoadReport(source="g2", revision=10)]
    idle = [LoadReport(source="g1", revision=10, instances={"a1": InstanceLoad(in_flight=0, enabled=False)}),
            LoadReport(source="g2", revision=11)]
    stale = [LoadReport(source="g1", revision=9), LoadReport(source="g2", revision=11)]
    assert not drained_idle("a1", busy, 10)
    assert drained_idle("a1", idle, 10)
    assert not drained_idle("a1", stale, 10)  # g1 may not have the drain yet
    assert not drained_idle("a1", [], 10)  # nobody reports: the drain timeout decides
    keep = plan_reconcile([dep(replicas=1)], drained, [worker("a"), worker("b")], ttl=TTL, grace=GRACE,
                          move_budget=10, drained_since={"a1": 99.0}, drain_timeout=30.0, now=100.0, idle=set())
    assert keep.delete == [] and keep.create == []  # in flight somewhere: it stays
    stop = plan_reconcile([dep(replicas=1)], drained, [worker("a"), worker("b")], ttl=TTL, grace=GRACE,
                          move_budget=10, drained_since={"a1": 99.0}, drain_timeout=30.0, now=100.0, idle={"a1"})
    assert stop.delete == [("a1", "drained: out of rotation and idle at every gateway")]
