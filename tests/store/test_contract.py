"""The Store contract (store/base.py), run unchanged against every backend.

Each test gets a private database or key prefix. The concurrency tests open two Store objects
on the same backend, as two controller processes would (memory:// shares one object: see
tests/store/conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from tests.conftest import free_port
from tests.store.conftest import BACKENDS

from modelfleet.models import (
    GPU,
    ApiKey,
    AutoscalePolicy,
    AutoscaleStatus,
    Deployment,
    InstanceLoad,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    LoadReport,
    ModelLoad,
    Placement,
    Resources,
    WorkerInfo,
)
from modelfleet.store import Store, StoreConfigError, StoreError, StoreUnavailable, open_store

pytestmark = pytest.mark.timeout(60)


def worker(i: int | str, **kw: object) -> WorkerInfo:
    fields: dict[str, object] = {
        "id": f"w{i}",
        "name": f"node-{i}",
        "address": "10.0.0.7",
        "port": 8200,
        "labels": {"zone": "a", "gpu": "yes"},
        "resources": Resources(
            cpu_cores=8,
            memory_total=32 << 30,
            memory_free=16 << 30,
            gpus=[GPU(index=0, name="L4", memory_total=24 << 30, memory_free=20 << 30)],
        ),
        "version": "0.1.0",
    }
    fields.update(kw)
    return WorkerInfo(**fields)  # type: ignore[arg-type]


def declared(iid: str, state: InstanceState = InstanceState.READY, **kw: object) -> InstanceStatus:
    """A status for an instance the worker runs on its own (it carries model/backend)."""
    fields: dict[str, object] = {
        "id": iid,
        "state": state,
        "endpoint": f"http://10.0.0.7:3{len(iid):04d}",
        "model": "smollm2",
        "backend": "llama.cpp",
        "source": "bundled:smollm2",
        "max_concurrency": 2,
        "declared": True,
    }
    fields.update(kw)
    return InstanceStatus(**fields)  # type: ignore[arg-type]


# -- lifecycle ---------------------------------------------------------------------------
async def test_migrate_is_idempotent_and_ping_needs_it(make_store: Callable[[], Store], backend: str) -> None:
    s = make_store()
    if backend != "memory":  # memory has no schema: it is always "migrated"
        with pytest.raises(StoreUnavailable):
            await s.ping()
    await s.migrate()
    await s.migrate()
    await s.ping()
    store_now = await s.now()
    # Every server here runs on this machine: its clock agrees with ours to well within 5 s.
    assert abs(store_now - time.time()) < 5


async def test_migrate_concurrently_from_two_controllers(make_store: Callable[[], Store]) -> None:
    a, b = make_store(), make_store()
    await asyncio.gather(a.migrate(), b.migrate(), a.migrate(), b.migrate())
    await a.ping()
    await b.ping()
    await b.migrate()
    assert (await a.heartbeat(worker(1))).registered


# -- workers -------------------------------------------------------------------------------
async def test_heartbeat_registers_once_and_keeps_registered_at(store: Store) -> None:
    rev0 = await store.get_revision()
    first = await store.heartbeat(worker(1))
    assert first.registered and first.revision == rev0 + 1
    rec1 = await store.get_worker("w1")
    assert rec1 is not None
    assert rec1.model_dump(include=set(worker(1).model_dump())) == worker(1).model_dump()
    assert rec1.registered_at <= rec1.last_heartbeat
    assert 0 <= rec1.heartbeat_age < 1

    await asyncio.sleep(0.05)
    changed = worker(1, name="renamed", labels={"zone": "b"}, port=8300)
    again = await store.heartbeat(changed)
    assert not again.registered and again.revision == rev0 + 1  # a renewal changes no route
    rec2 = await store.get_worker("w1")
    assert rec2 is not None
    assert (rec2.name, rec2.labels, rec2.port) == ("renamed", {"zone": "b"}, 8300)
    assert rec2.registered_at == rec1.registered_at
    assert rec2.last_heartbeat > rec1.last_heartbeat
    assert rec2.resources.gpus[0].memory_free == 20 << 30

    await store.heartbeat(worker(0))
    assert [w.id for w in await store.list_workers()] == ["w0", "w1"]
    assert await store.get_worker("nobody") is None


async def test_heartbeat_age_is_computed_on_read_from_the_store_clock(store: Store) -> None:
    await store.heartbeat(worker(1))
    await asyncio.sleep(0.3)
    (rec,) = await store.list_workers()
    assert 0.25 <= rec.heartbeat_age < 5
    # age = store_now - last_heartbeat, both on the store's clock.
    assert abs((await store.now()) - rec.last_heartbeat - rec.heartbeat_age) < 0.5
    await store.heartbeat(worker(1))
    fresh = await store.get_worker("w1")
    assert fresh is not None and fresh.heartbeat_age < 0.25


async def test_heartbeat_with_statuses_syncs_declared_and_assigned_instances(store: Store) -> None:
    await store.heartbeat(worker(1))
    await store.heartbeat(worker(2))
    assigned = await store.create_instance(
        InstanceSpec(id="assigned", model="qwen", deployment="qwen", worker_id="w1", params={"ctx": 4096})
    )
    assert assigned.state == InstanceState.PENDING
    await store.heartbeat(worker(2), [declared("other")])

    rev = await store.get_revision()
    res = await store.heartbeat(
        worker(1),
        [
            declared("own", InstanceState.STARTING),
            InstanceStatus(id="assigned", state=InstanceState.READY, endpoint="http://10.0.0.7:30001"),
            InstanceStatus(id="unknown-without-model", state=InstanceState.READY),
            # Carries a model but is not declared: a report never creates an assigned instance.
            declared("undeclared", declared=False),
            # Another worker's instance: a stale report about it changes nothing.
            InstanceStatus(id="other", state=InstanceState.FAILED, last_error="not yours"),
        ],
    )
    assert not res.registered and res.revision == rev + 1
    own = await store.get_instance("own")
    assert own is not None
    assert (own.model, own.backend, own.source, own.max_concurrency) == (
        "smollm2",
        "llama.cpp",
        "bundled:smollm2",
        2,
    )
    assert (own.worker_id, own.deployment, own.state) == ("w1", None, InstanceState.STARTING)
    got = await store.get_instance("assigned")
    assert got is not None
    assert (got.state, got.endpoint, got.deployment, got.params) == (
        InstanceState.READY,
        "http://10.0.0.7:30001",
        "qwen",
        {"ctx": 4096},
    )
    assert got.updated_at >= assigned.updated_at
    assert await store.get_instance("unknown-without-model") is None
    assert await store.get_instance("undeclared") is None
    other = await store.get_instance("other")
    assert other is not None and (other.state, other.last_error) == (InstanceState.READY, None)

    # The assigned instance moves to w2 (the reconciler): w1's late report no longer touches it.
    await store.update_instance("assigned", worker_id="w2")
    await store.heartbeat(
        worker(1), [declared("own", InstanceState.STARTING), InstanceStatus(id="assigned", state=InstanceState.FAILED)]
    )
    got = await store.get_instance("assigned")
    assert got is not None and got.state == InstanceState.READY
    await store.update_instance("assigned", worker_id="w1")

    # Update: observed fields change; the declared spec stays as first reported.
    await store.heartbeat(
        worker(1), [declared("own", InstanceState.FAILED, restarts=3, last_error="oom", model="changed")]
    )
    own = await store.get_instance("own")
    assert own is not None
    assert (own.state, own.restarts, own.last_error, own.model) == (InstanceState.FAILED, 3, "oom", "smollm2")

    # No longer reported: the declared instance goes, the assigned one stays, the other
    # worker's declared instance is not this worker's business.
    res = await store.heartbeat(worker(1), [])
    assert res.revision > rev + 1
    assert await store.get_instance("own") is None
    assert await store.get_instance("assigned") is not None
    assert await store.get_instance("other") is not None
    assert [i.id for i in await store.list_instances(worker_id="w1")] == ["assigned"]

    # statuses=None means "no change": nothing is touched and the revision stays.
    await store.heartbeat(worker(2), [declared("other"), declared("other2")])
    rev = await store.get_revision()
    assert (await store.heartbeat(worker(2))).revision == rev
    assert {i.id for i in await store.list_instances(worker_id="w2")} == {"other", "other2"}


async def test_first_heartbeat_with_statuses_registers_and_creates(store: Store) -> None:
    rev = await store.get_revision()
    res = await store.heartbeat(worker(9), [declared("a"), declared("b")])
    assert res.registered
    assert res.revision >= rev + 1
    assert res.revision == await store.get_revision()
    assert [i.id for i in await store.list_instances(worker_id="w9")] == ["a", "b"]


async def test_delete_worker_removes_its_declared_instances_only(store: Store) -> None:
    await store.heartbeat(worker(1), [declared("own")])
    await store.create_instance(InstanceSpec(id="placed", model="m", deployment="m", worker_id="w1"))
    rev = await store.get_revision()
    assert await store.delete_worker("w1")
    assert await store.get_revision() == rev + 1
    assert await store.get_worker("w1") is None
    assert await store.get_instance("own") is None
    assert await store.get_instance("placed") is not None  # the reconciler's to replace
    assert not await store.delete_worker("w1")
    assert (await store.heartbeat(worker(1))).registered  # comes back as a new registration


async def test_delete_dead_workers(store: Store) -> None:
    await store.heartbeat(worker("old"), [declared("old-own")])
    await store.create_instance(InstanceSpec(id="old-placed", model="m", deployment="m", worker_id="wold"))
    await asyncio.sleep(0.6)
    await store.heartbeat(worker("new"), [declared("new-own")])
    rev = await store.get_revision()
    assert await store.delete_dead_workers(0.4) == ["wold"]
    assert await store.get_revision() == rev + 1
    assert [w.id for w in await store.list_workers()] == ["wnew"]
    assert await store.get_instance("old-own") is None
    assert await store.get_instance("old-placed") is not None
    assert await store.get_instance("new-own") is not None
    assert await store.delete_dead_workers(0.4) == []
    assert await store.get_revision() == rev + 1


# -- instances -----------------------------------------------------------------------------
async def test_instance_crud(store: Store) -> None:
    rev = await store.get_revision()
    spec = InstanceSpec(
        id="i1",
        model="smollm2",
        deployment="smollm2",
        backend="llama.cpp",
        source="bundled:smollm2",
        params={"n_ctx": 2048, "stop": [], "nested": {"a": [1, 2.5, None]}},
        weight=50,
        max_concurrency=8,
        pending_reason="no worker fits",
    )
    created = await store.create_instance(spec)
    assert created.model_dump(include=set(spec.model_dump())) == spec.model_dump()
    assert (created.state, created.endpoint, created.restarts) == (InstanceState.PENDING, None, 0)
    assert abs(created.updated_at - await store.now()) < 5
    assert await store.get_revision() == rev + 1
    with pytest.raises(StoreError):
        await store.create_instance(spec)
    assert await store.get_revision() == rev + 1

    await store.create_instance(InstanceSpec(id="i2", model="minilm", deployment="minilm", worker_id="w2"))
    assert await store.get_instance("i1") == created
    assert [i.id for i in await store.list_instances()] == ["i1", "i2"]
    assert [i.id for i in await store.list_instances(model="minilm")] == ["i2"]
    assert [i.id for i in await store.list_instances(worker_id="w2")] == ["i2"]
    assert await store.list_instances(worker_id="w2", model="smollm2") == []

    updated = await store.update_instance(
        "i1",
        worker_id="w2",
        enabled=False,
        weight=10,
        params={"n_ctx": 4096},
        pending_reason=None,
        state=InstanceState.STARTING,
        last_error="retrying",
    )
    assert updated is not None
    assert (updated.worker_id, updated.enabled, updated.weight, updated.params) == ("w2", False, 10, {"n_ctx": 4096})
    assert (updated.pending_reason, updated.state, updated.last_error) == (None, InstanceState.STARTING, "retrying")
    assert updated.updated_at >= created.updated_at
    assert await store.get_instance("i1") == updated
    assert [i.id for i in await store.list_instances(worker_id="w2")] == ["i1", "i2"]
    moved = await store.update_instance("i1", worker_id=None)
    assert moved is not None and moved.worker_id is None
    assert [i.id for i in await store.list_instances(worker_id="w2")] == ["i2"]
    assert await store.get_revision() == rev + 4

    with pytest.raises(StoreError):
        await store.update_instance("i1", model="not-a-spec-field")
    assert await store.update_instance("missing", weight=1) is None
    assert await store.delete_instance("i1")
    assert not await store.delete_instance("i1")
    assert await store.get_instance("i1") is None
    assert await store.get_revision() == rev + 5


# -- deployments ---------------------------------------------------------------------------
async def test_deployments(store: Store) -> None:
    rev = await store.get_revision()
    d = Deployment(
        name="org/smollm2:q4",
        source="bundled:smollm2",
        params={"n_ctx": 2048},
        replicas=2,
        placement=Placement(labels={"zone": "a"}, gpus=1, gpu_memory=1 << 30, policy="binpack"),
        weight=70,
    )
    created = await store.put_deployment(d)
    assert created.model_dump(exclude={"created_at", "updated_at"}) == d.model_dump(
        exclude={"created_at", "updated_at"}
    )
    assert created.created_at > 0 and created.created_at == created.updated_at
    assert await store.get_deployment(d.name) == created
    await asyncio.sleep(0.02)
    changed = await store.put_deployment(d.model_copy(update={"replicas": 5}))
    assert changed.replicas == 5
    assert changed.created_at == created.created_at and changed.updated_at > created.updated_at
    await store.put_deployment(Deployment(name="a-first"))
    assert [x.name for x in await store.list_deployments()] == ["a-first", d.name]
    assert await store.get_revision() == rev + 3
    assert await store.delete_deployment(d.name)
    assert not await store.delete_deployment(d.name)
    assert await store.get_deployment(d.name) is None
    assert await store.get_revision() == rev + 4


async def test_deployment_error_is_recorded_alone_and_cleared_by_a_change(store: Store) -> None:
    d = await store.put_deployment(Deployment(name="poison", params={"big": 2**40, "s": "\u00e9"}, weight=7))
    rev = await store.get_revision()
    assert await store.set_deployment_error("poison", "id: String should have at most 128 characters")
    got = await store.get_deployment("poison")
    assert got is not None and got.error == "id: String should have at most 128 characters"
    # Only the error changed: the rest of the deployment, exactly (big numbers included).
    assert got.model_dump(exclude={"error"}) == d.model_dump(exclude={"error"})
    assert [x.error for x in await store.list_deployments()] == [got.error]
    assert await store.get_revision() == rev  # routing does not change
    assert await store.set_deployment_error("poison", None)
    assert (await store.get_deployment("poison")).error is None  # type: ignore[union-attr]
    await store.set_deployment_error("poison", "again")
    changed = await store.put_deployment(got.model_copy(update={"replicas": 3}))  # an operator's change
    assert changed.error is None and (await store.get_deployment("poison")).error is None  # type: ignore[union-attr]
    assert not await store.set_deployment_error("missing", "x")
    assert await store.get_deployment("missing") is None
    await store.set_deployment_error("poison", "x")
    assert await store.delete_deployment("poison")
    await store.put_deployment(Deployment(name="poison"))
    assert (await store.get_deployment("poison")).error is None  # type: ignore[union-attr]


# -- leases --------------------------------------------------------------------------------
async def test_lease_rules(store: Store) -> None:
    a = await store.acquire_lease("scheduler", "ctl-a", 10)
    assert a is not None and (a.holder, a.token) == ("ctl-a", 1) and 9 < a.expires_in <= 10
    assert await store.acquire_lease("scheduler", "ctl-b", 10) is None
    got = await store.get_lease("scheduler")
    assert got is not None and (got.holder, got.token) == ("ctl-a", 1) and 0 < got.expires_in <= 10
    renewed = await store.acquire_lease("scheduler", "ctl-a", 20)
    assert renewed is not None and renewed.token == 1  # a renewal keeps the token
    got = await store.get_lease("scheduler")
    assert got is not None and got.expires_in > 10

    await store.release_lease("scheduler", "ctl-b")  # not the holder: no effect
    assert (await store.get_lease("scheduler")) is not None
    await store.release_lease("scheduler", "ctl-a")
    assert await store.get_lease("scheduler") is None
    b = await store.acquire_lease("scheduler", "ctl-b", 10)  # at once after a release
    assert b is not None and (b.holder, b.token) == ("ctl-b", 2)

    # Expiry hands the lease over with a bigger token.
    short = await store.acquire_lease("gc", "ctl-a", 0.3)
    assert short is not None and short.token == 1
    assert await store.acquire_lease("gc", "ctl-b", 5) is None
    await asyncio.sleep(0.45)
    assert await store.get_lease("gc") is None
    taken = await store.acquire_lease("gc", "ctl-b", 5)
    assert taken is not None and (taken.holder, taken.token) == ("ctl-b", 2)
    assert await store.acquire_lease("gc", "ctl-a", 5) is None
    assert await store.get_lease("nothing") is None


# -- revision and api keys -------------------------------------------------------------------
async def test_revision_and_api_keys(store: Store) -> None:
    rev = await store.get_revision()
    assert await store.bump_revision() == rev + 1
    assert await store.get_revision() == rev + 1

    key = await store.create_api_key(ApiKey(id="k2", name="ci", secret_hash="ab" * 32))
    assert key.created_at > 0 and not key.revoked
    with pytest.raises(StoreError):
        await store.create_api_key(ApiKey(id="k2", name="dup", secret_hash="cd" * 32))
    await store.create_api_key(ApiKey(id="k1", name="ops", secret_hash="ef" * 32))
    assert [k.id for k in await store.list_api_keys()] == ["k1", "k2"]
    assert await store.get_revision() == rev + 3
    assert await store.revoke_api_key("k2")
    assert await store.get_revision() == rev + 4
    assert not await store.revoke_api_key("nope")
    keys = {k.id: k for k in await store.list_api_keys()}
    assert keys["k2"].revoked and not keys["k1"].revoked
    assert keys["k2"].secret_hash == "ab" * 32 and keys["k2"].created_at == key.created_at


# -- two controllers at once ---------------------------------------------------------------
async def test_200_workers_register_through_two_controllers(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    rev = await a.get_revision()
    # Every worker heartbeats through both controllers at the same moment: each registers
    # exactly once, whichever wins.
    results = await asyncio.gather(*(s.heartbeat(worker(i)) for i in range(200) for s in (a, b)))
    assert sum(r.registered for r in results) == 200
    for i in range(200):
        assert results[2 * i].registered != results[2 * i + 1].registered
    assert len(await a.list_workers()) == 200
    assert len(await b.list_workers()) == 200
    assert await b.get_revision() == rev + 200


async def test_heartbeat_racing_health_reads_never_reads_dead(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    ttl, interval, duration = 1.0, 0.1, 1.5
    workers = [worker(i) for i in range(10)]
    for w in workers:
        await a.heartbeat(w)
    stop = time.monotonic() + duration
    ages: list[float] = []

    async def beat(w: WorkerInfo) -> None:
        while time.monotonic() < stop:
            await a.heartbeat(w)
            await asyncio.sleep(interval)

    async def read() -> None:
        while time.monotonic() < stop:
            ages.extend(rec.heartbeat_age for rec in await b.list_workers())
            ages.extend(rec.heartbeat_age for rec in await a.list_workers())
            await asyncio.sleep(0.005)  # memory:// never suspends: let the heartbeats run

    await asyncio.gather(read(), *(beat(w) for w in workers))
    assert len(ages) >= 100
    assert min(ages) >= 0
    assert max(ages) < ttl, f"a heartbeating worker read as dead: age {max(ages):.3f}s >= ttl {ttl}s"


async def test_revision_only_grows_under_concurrent_bumps(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    start = await a.get_revision()
    n = 100

    async def bump_many(s: Store) -> list[int]:
        seen = []
        for _ in range(n):
            seen.append(await s.bump_revision())
        return seen

    async def read_many(s: Store) -> list[int]:
        return [await s.get_revision() for _ in range(n // 2)]

    results = await asyncio.gather(bump_many(a), bump_many(b), read_many(b), *(s.bump_revision() for s in (a, b) * 25))
    seq_a, seq_b, reads = results[:3]
    assert seq_a == sorted(seq_a) and seq_b == sorted(seq_b)
    assert reads == sorted(reads)  # one reader never sees the revision go back
    assert len(set(seq_a) | set(seq_b)) == 2 * n  # every bump got its own value
    assert await a.get_revision() == start + 2 * n + 50


async def test_lease_has_one_holder_when_two_race(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    for round_ in range(15):
        name = f"race-{round_}"
        la, lb = await asyncio.gather(a.acquire_lease(name, "ctl-a", 5), b.acquire_lease(name, "ctl-b", 5))
        assert (la is None) != (lb is None), (la, lb)
        winner = la or lb
        assert winner is not None and winner.token == 1
        current = await a.get_lease(name)
        assert current is not None and current.holder == winner.holder
    # Handover under contention: the token grows by one per change of hands, never goes back.
    tokens = []
    for holder, s in [("ctl-a", a), ("ctl-b", b), ("ctl-a", a)]:
        got = await s.acquire_lease("handover", holder, 5)
        assert got is not None
        tokens.append(got.token)
        again = await s.acquire_lease("handover", holder, 5)
        assert again is not None and again.token == got.token
        await s.release_lease("handover", holder)
    assert tokens == [1, 2, 3]


async def test_gc_never_deletes_a_worker_that_heartbeats(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    live = [worker(f"live{i}") for i in range(10)]
    await a.heartbeat(worker("stale"))
    for w in live:
        await a.heartbeat(w)
    stop = time.monotonic() + 1.5
    deleted: list[str] = []

    async def beat(w: WorkerInfo) -> None:
        while time.monotonic() < stop:
            await a.heartbeat(w)
            await asyncio.sleep(0.05)

    async def gc() -> None:
        while time.monotonic() < stop:
            deleted.extend(await b.delete_dead_workers(1.0))
            await asyncio.sleep(0.01)

    await asyncio.gather(gc(), *(beat(w) for w in live))
    assert deleted == ["wstale"]
    assert sorted(w.id for w in await b.list_workers()) == sorted(w.id for w in live)


# -- bad URLs ------------------------------------------------------------------------------
def _unreachable_url(backend: str, tmp_path: object) -> str:
    port = free_port()  # nothing listens there
    return {
        "sqlite": "sqlite:////dev/null/state.db",  # a "directory" that cannot be created
        "postgresql": f"postgresql://modelfleet:s3cr3t-pw@127.0.0.1:{port}/mf",
        "mysql": f"mysql://modelfleet:s3cr3t-pw@127.0.0.1:{port}/mf",
        "redis": f"redis://:s3cr3t-pw@127.0.0.1:{port}/0?prefix=mf",
    }[backend]


# memory:// has no server to be unreachable and no database to be missing: not parametrized over it.
SERVER_BACKENDS = [b for b in BACKENDS if b != "memory"]


@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
async def test_unreachable_store_fails_fast_without_leaking_the_password(backend: str, tmp_path: object) -> None:
    s = open_store(_unreachable_url(backend, tmp_path))
    try:
        for call in (s.ping, s.migrate, lambda: s.heartbeat(worker(1))):
            started = time.monotonic()
            with pytest.raises((StoreUnavailable, StoreConfigError)) as err:
                await call()
            assert time.monotonic() - started < 5
            assert "s3cr3t" not in str(err.value)
            assert "127.0.0.1" in str(err.value) or backend == "sqlite"
    finally:
        await s.close()


@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
async def test_url_to_a_missing_database_is_a_config_error(backend: str, store_url: str) -> None:
    bad = {
        "sqlite": "sqlite:////dev/null/state.db",
        "postgresql": store_url.replace("postgres@", "postgres:s3cr3t-pw@") + "_missing",
        "mysql": store_url.replace("root@", "root:s3cr3t-pw@"),  # wrong password for root
        "redis": store_url.replace("/0?", "/99999?"),  # no such database number
    }[backend]
    s = open_store(bad)
    try:
        with pytest.raises(StoreConfigError) as err:
            await s.migrate()
        assert "s3cr3t" not in str(err.value)
    finally:
        await s.close()


# -- identity, auth state, liveness across outages, revision floor ---------------------------
async def test_cluster_identity_is_written_once_and_revision_starts_at_the_time_in_ms(
    make_store: Callable[[], Store],
) -> None:
    started_ms = int(time.time() * 1000)
    a, b = make_store(), make_store()
    assert (await a.get_cluster_meta()).cluster_id is None  # never migrated: no identity
    await asyncio.gather(a.migrate(), b.migrate())
    meta = await a.get_cluster_meta()
    assert meta.cluster_id and len(meta.cluster_id) >= 16
    assert (meta.auth, meta.replaces) == ("none", ())
    await b.migrate()
    assert (await b.get_cluster_meta()).cluster_id == meta.cluster_id  # written once, seen by all
    # A fresh store's revision starts at the time in ms: far above any revision a reader of a
    # store that lost its state can hold.
    assert started_ms - 60_000 <= await a.get_revision() <= int(time.time() * 1000) + 60_000


async def test_auth_state_once_required_stays_required_until_opened(store: Store) -> None:
    assert (await store.get_cluster_meta()).auth == "none"
    await store.create_api_key(ApiKey(id="k1", name="ops", secret_hash="ab" * 32))
    assert (await store.get_cluster_meta()).auth == "required"
    await store.revoke_api_key("k1")
    assert (await store.get_cluster_meta()).auth == "required"  # no key left: still closed
    rev = await store.get_revision()
    await store.open_inference()
    assert (await store.get_cluster_meta()).auth == "opened"
    assert await store.get_revision() == rev + 1  # gateways learn it on their next refresh
    await store.create_api_key(ApiKey(id="k2", name="ops", secret_hash="cd" * 32))
    assert (await store.get_cluster_meta()).auth == "required"


async def test_record_accepted_keeps_the_lineage_and_auth(store: Store) -> None:
    rev = await store.get_revision()
    await store.record_accepted("old-cluster", auth_required=True)
    await store.record_accepted("old-cluster", auth_required=True)
    await store.record_accepted("older", auth_required=False)
    meta = await store.get_cluster_meta()
    assert meta.replaces == ("old-cluster", "older") and meta.auth == "required"
    assert await store.get_revision() == rev + 3


async def test_advance_revision_only_raises(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    rev = await a.get_revision()
    assert await a.advance_revision(rev - 5) == rev
    assert await b.advance_revision(rev + 1000) == rev + 1000
    assert await a.get_revision() == rev + 1000
    assert await a.bump_revision() == rev + 1001


async def test_outage_time_does_not_count_against_workers(two_stores: tuple[Store, Store]) -> None:
    """Two controllers regain the store after an outage: the time no heartbeat could land is
    left out of every age (counted once), so every worker is exactly as silent as it was when
    the outage began (a dead one stays dead), and the GC uses the same ages."""
    a, b = two_stores
    await a.heartbeat(worker("dead"))
    await asyncio.sleep(1.5)
    await a.heartbeat(worker(1))
    await b.heartbeat(worker(2))
    assert await a.record_outage() < 0.5  # heartbeats just landed: next to nothing to forgive
    before = {w.id: w for w in await a.list_workers()}
    # How long each had been silent when the last heartbeat before the outage landed (w2's).
    silent = {wid: before["w2"].last_heartbeat - w.last_heartbeat for wid, w in before.items()}
    assert silent["w2"] == 0 and silent["wdead"] >= 1.4

    await asyncio.sleep(1.2)  # the outage: no heartbeat lands anywhere
    back = time.monotonic()
    added = await a.record_outage()
    assert 1.1 <= added < 5.0, added
    assert await b.record_outage() < 0.5  # the same outage, seen by the second controller
    ages = {w.id: w.heartbeat_age for w in await b.list_workers()}
    since_back = time.monotonic() - back
    for wid in ("w1", "w2", "wdead"):
        assert silent[wid] - 0.01 <= ages[wid] <= silent[wid] + since_back + 0.01, (wid, ages, silent, since_back)
    w2 = await a.get_worker("w2")
    assert w2 is not None and w2.heartbeat_age <= time.monotonic() - back + 0.01
    assert w2.last_heartbeat == before["w2"].last_heartbeat  # the heartbeat time itself is untouched

    await asyncio.sleep(0.3)
    beat = time.monotonic()
    await a.heartbeat(worker(1))
    ages = {w.id: w.heartbeat_age for w in await a.list_workers()}
    assert ages["w1"] <= time.monotonic() - beat + 0.01
    assert 0.29 <= ages["w2"] <= time.monotonic() - back + 0.01, ages
    # A GC threshold between w2 and the dead worker: w2's raw age (heartbeat to now, outage
    # included) is above it, its age without the outage is not.
    older = (ages["w2"] + ages["wdead"]) / 2
    assert await a.now() - before["w2"].last_heartbeat > older
    assert await b.delete_dead_workers(older) == ["wdead"]
    assert sorted(w.id for w in await a.list_workers()) == ["w1", "w2"]


async def test_record_outage_without_workers_adds_nothing(store: Store) -> None:
    assert await store.record_outage() == 0.0
    await asyncio.sleep(0.2)
    assert await store.record_outage() == 0.0


def _wipe(store_url: str) -> None:
    """What a server that lost its state looks like: every table / key of this store gone."""
    if store_url.startswith("redis"):
        import redis

        prefix = store_url.rsplit("prefix=", 1)[1]
        r = redis.Redis(host="127.0.0.1", port=6379)
        for k in r.scan_iter(f"{prefix}:*"):
            r.delete(k)
        r.close()
        return
    import sqlalchemy as sa

    from modelfleet.store.sql import SQLStore

    engine = sa.create_engine(SQLStore(store_url)._sync_url, poolclass=sa.NullPool)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        meta.drop_all(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
async def test_a_store_that_lost_its_state_shows_no_identity_and_takes_no_writes(
    backend: str, store_url: str, store: Store
) -> None:
    await store.heartbeat(worker(1))
    old = await store.get_cluster_meta()
    old_rev = await store.get_revision()
    await asyncio.to_thread(_wipe, store_url)
    assert (await store.get_cluster_meta()).cluster_id is None
    with pytest.raises(StoreError):
        await store.heartbeat(worker(1))
    with pytest.raises(StoreError):
        await store.bump_revision()
    # Created again (an operator accepts the loss): a new identity, a revision above the old one.
    await store.migrate()
    new = await store.get_cluster_meta()
    assert new.cluster_id and new.cluster_id != old.cluster_id
    assert await store.get_revision() > old_rev
    assert await store.list_workers() == []


async def test_persistence_is_reported(backend: str, store: Store) -> None:
    p = await store.persistence()
    if backend == "memory":
        assert p.kind == "volatile"
    elif backend == "redis":
        import redis

        r = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
        try:
            volatile = not r.config_get("save")["save"].strip() and r.config_get("appendonly")["appendonly"] == "no"
        finally:
            r.close()
        assert p.kind == ("volatile" if volatile else "durable"), p
        if volatile:
            assert "neither RDB snapshots" in p.detail
    else:
        assert p.kind == "durable"


# -- autoscaling: the autoscaler's write and gateways' load reports (issue 12) -------------
async def test_deployment_scale_is_written_alone_and_kept_by_an_operators_change(store: Store) -> None:
    policy = AutoscalePolicy(min_replicas=0, max_replicas=5, target_ongoing=2, idle_after_s=60)
    d = await store.put_deployment(Deployment(name="auto", params={"big": 2**40}, replicas=1, autoscale=policy))
    rev = await store.get_revision()
    status = AutoscaleStatus(desired=3, load=5.5, reason="load 5.5 over target 2 per replica", at=123.5)
    assert await store.set_deployment_scale("auto", 3, status)
    got = await store.get_deployment("auto")
    assert got is not None and got.replicas == 3 and got.autoscale_status == status
    # Nothing else changed (policy and big numbers included), and routing did not move.
    assert got.model_dump(exclude={"replicas", "autoscale_status"}) == d.model_dump(
        exclude={"replicas", "autoscale_status"})
    assert [(x.replicas, x.autoscale_status) for x in await store.list_deployments()] == [(3, status)]
    assert await store.get_revision() == rev
    # An operator's change (read, changed, put back) keeps what the autoscaler wrote.
    changed = await store.put_deployment(got.model_copy(update={"weight": 9}))
    again = await store.get_deployment("auto")
    assert changed.replicas == 3 and again is not None and (again.replicas, again.weight) == (3, 9)
    assert again.autoscale_status == status
    assert await store.set_deployment_scale("auto", 0, None)
    zero = await store.get_deployment("auto")
    assert zero is not None and zero.replicas == 0 and zero.autoscale_status is None
    assert not await store.set_deployment_scale("missing", 2, status)
    assert await store.get_deployment("missing") is None


async def test_load_reports_are_upserted_and_expire_by_the_stores_clock(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    report = LoadReport(source="gw-1:8000#0", revision=7, models={"m": ModelLoad(in_flight=3, queued=2)},
                        instances={"w1/a": InstanceLoad(in_flight=3, enabled=False)})
    await a.put_load_report(report, ttl=1.5)
    got = await b.list_load_reports()  # another controller reads it
    assert len(got) == 1 and 0 < got[0].expires_in <= 1.5
    assert got[0].model_dump(exclude={"expires_in"}) == report.model_dump(exclude={"expires_in"})
    # Upsert by source: the newer report replaces the older, and its TTL starts again.
    await b.put_load_report(report.model_copy(update={"models": {"m": ModelLoad(in_flight=1)}}), ttl=30)
    await a.put_load_report(LoadReport(source="gw-2:8000#0"), ttl=1.0)
    got = sorted(await a.list_load_reports(), key=lambda r: r.source)
    assert [r.source for r in got] == ["gw-1:8000#0", "gw-2:8000#0"]
    assert got[0].models["m"].in_flight == 1 and got[0].expires_in > 25
    # A gateway that stops reporting stops counting once its TTL has passed.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(await b.list_load_reports()) > 1:  # noqa: ASYNC110 (polls the store)
        await asyncio.sleep(0.1)
    assert [r.source for r in await b.list_load_reports()] == ["gw-1:8000#0"]
