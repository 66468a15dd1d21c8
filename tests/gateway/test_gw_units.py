"""Pure gateway logic, without sockets: balancer, admission, ejection, route tables,
snapshots, auth, usage parsing, recent stats, settings; and the pool's queue bookkeeping."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelfleet.gateway import admission, balancer, ejection
from modelfleet.gateway.auth import bearer_token, key_allowed
from modelfleet.gateway.pool import Inst, NoInstance, Overloaded, Pool
from modelfleet.gateway.proxy import can_retry, sse_error, usage_tokens
from modelfleet.gateway.routes import (
    EMPTY,
    ClusterMemory,
    Freshness,
    Grace,
    is_ready,
    judge_table,
    keep_missing,
    load_snapshot,
    parse_routes,
    remember,
    save_snapshot,
    sudden_loss,
)
from modelfleet.gateway.settings import GatewaySettings
from modelfleet.gateway.stats import RecentStats, outcome


@dataclass
class C:
    id: str
    weight: int = 100
    max_concurrency: int = 4
    in_flight: int = 0
    enabled: bool = True
    ejected_until: float = 0.0


# -- balancer ------------------------------------------------------------------------------------
def test_choose_skips_disabled_ejected_excluded_and_zero_weight() -> None:
    rng = random.Random(1)
    cands = [C("dis", enabled=False), C("ej", ejected_until=100.0), C("ex"), C("zero", weight=0), C("ok")]
    for _ in range(50):
        assert balancer.choose(cands, 50.0, rng, exclude={"ex"}).id == "ok"  # type: ignore[union-attr]


def test_choose_verdicts() -> None:
    rng = random.Random(1)
    assert balancer.choose([], 0, rng) is balancer.NO_INSTANCE
    assert balancer.choose([C("a", enabled=False)], 0, rng) is balancer.NO_INSTANCE
    assert balancer.choose([C("a")], 0, rng, exclude={"a"}) is balancer.NO_INSTANCE
    assert balancer.choose([C("a", in_flight=4), C("b", max_concurrency=1, in_flight=1)], 0, rng) is balancer.ALL_FULL


def test_panic_mode_when_every_instance_is_ejected() -> None:
    rng = random.Random(1)
    cands = [C("a", ejected_until=10.0), C("b", ejected_until=10.0)]
    assert balancer.choose(cands, 5.0, rng).id in {"a", "b"}  # type: ignore[union-attr]
    assert balancer.choose(cands, 5.0, rng, exclude={"a"}).id == "b"  # type: ignore[union-attr]


def test_p2c_prefers_less_loaded() -> None:
    rng = random.Random(2)
    busy, idle = C("busy", in_flight=3), C("idle", in_flight=0)
    assert all(balancer.p2c([busy, idle], rng) is idle for _ in range(100))


def test_idle_traffic_follows_weights() -> None:
    rng = random.Random(3)
    cands = [C("light", weight=100), C("heavy", weight=300)]
    counts = Counter(balancer.choose(cands, 0, rng).id for _ in range(8000))  # type: ignore[union-attr]
    assert 0.70 < counts["heavy"] / 8000 < 0.80  # 3:1


def test_loaded_traffic_is_per_weight_unit() -> None:
    # heavy has twice the weight and twice the in-flight: a tie, so weights decide; with one
    # more in flight than its share, the light one wins.
    light, heavy = C("light", weight=100, in_flight=1), C("heavy", weight=200, in_flight=3)
    assert balancer.less_loaded(light, heavy)
    assert not balancer.less_loaded(heavy, light)


def test_p2c_spreads_over_many() -> None:
    rng = random.Random(4)
    cands = [C(str(i)) for i in range(10)]
    counts = Counter(balancer.p2c(cands, rng).id for _ in range(5000))
    assert len(counts) == 10 and min(counts.values()) > 350


def test_affinity_is_stable_and_yields_to_load() -> None:
    rng = random.Random(5)
    cands = [C("a"), C("b"), C("c")]
    pins = {balancer.choose(cands, 0, rng, session=b"user-1").id for _ in range(20)}  # type: ignore[union-attr]
    assert len(pins) == 1
    pin = next(c for c in cands if c.id in pins)
    # Other sessions land elsewhere too: the hash spreads them.
    spread = {balancer.choose(cands, 0, rng, session=f"s{i}".encode()).id for i in range(60)}  # type: ignore[union-attr]
    assert spread == {"a", "b", "c"}
    # Removing another instance does not move this session.
    others = [c for c in cands if c is not pin]
    assert balancer.choose([pin, others[0]], 0, rng, session=b"user-1") is pin
    # Much busier than the least busy: give way.
    pin.in_flight = 6
    assert balancer.choose(cands, 0, rng, session=b"user-1") is not pin
    # A little busier: stay.
    pin.in_flight = 2
    assert balancer.choose(cands, 0, rng, session=b"user-1") is pin
    # Full: give way.
    pin.in_flight = 4
    assert balancer.choose(cands, 0, rng, session=b"user-1") is not pin


def test_much_busier() -> None:
    assert balancer.much_busier(C("p", in_flight=9), C("l", in_flight=4), slack=4, ratio=2.0)
    assert not balancer.much_busier(C("p", in_flight=8), C("l", in_flight=4), slack=4, ratio=2.0)  # gap 4
    assert not balancer.much_busier(C("p", in_flight=30), C("l", in_flight=20), slack=4, ratio=2.0)  # 1.5x


def test_rendezvous_is_process_independent() -> None:
    # blake2b, not hash(): the same in every gateway process.
    s = balancer.rendezvous_score(b"x", "a", 100)
    h = int.from_bytes(hashlib.blake2b(b"x\0a", digest_size=8).digest(), "big")
    assert s == pytest.approx(100 / -__import__("math").log((h + 1) / (2**64 + 2)))


# -- admission and ejection ------------------------------------------------------------------------
def test_retry_after() -> None:
    assert admission.retry_after_s(0, 4, 0.1) == 1  # at least one second
    assert admission.retry_after_s(99, 4, 2.0) == 50
    assert admission.retry_after_s(1000, 1, 10.0) == 60  # capped
    assert admission.retry_after_s(5, 0, 1.0) == 6  # no slots: treated as one


def test_queue_has_room_and_shares() -> None:
    assert admission.queue_has_room(0, 1) and not admission.queue_has_room(1, 1)
    assert not admission.queue_has_room(0, 0)
    assert [admission.process_share(10, 4, i) for i in range(4)] == [3, 3, 2, 2]
    assert [admission.process_share(2, 4, i) for i in range(4)] == [1, 1, 1, 1]
    assert admission.ewma(0.0, 2.0) == 2.0 and admission.ewma(1.0, 2.0) == pytest.approx(1.1)


def test_ejection_arithmetic() -> None:
    assert [ejection.is_retryable_status(s) for s in (429, 500, 502, 503, 504, 400)] == [
        True, False, True, True, True, False]
    assert not ejection.should_eject(2, 3) and ejection.should_eject(3, 3)
    assert [ejection.cooldown_s(n, 10, 300) for n in (1, 2, 3, 6)] == [10, 20, 40, 300]
    assert ejection.ejections_after_quiet(3, last_ejected_at=0, now=50, base=10, cap=300) == 3
    assert ejection.ejections_after_quiet(3, last_ejected_at=0, now=81, base=10, cap=300) == 0
    assert can_retry(1, 0.0, 1.0, 3, 30) and not can_retry(3, 0.0, 1.0, 3, 30)
    assert not can_retry(1, 0.0, 31.0, 3, 30)


# -- route tables ------------------------------------------------------------------------------
PAYLOAD = {
    "revision": 7, "store_time": 1.0, "controller_id": "c1", "heartbeat_ttl": 6.0,
    "models": [
        {"name": "m", "instances": [
            {"id": "i1", "worker_id": "w", "endpoint": "http://h:1/", "weight": 100, "max_concurrency": 2,
             "enabled": True, "state": "ready"},
            {"id": "i2", "worker_id": "w", "endpoint": "http://h:2", "weight": 50, "max_concurrency": 2,
             "enabled": True, "state": "draining"},
        ]},
        {"name": "empty", "instances": []},
    ],
    "api_keys": [{"id": "k", "secret_hash": "AB" * 32}],
}


def test_parse_routes() -> None:
    t = parse_routes(PAYLOAD)
    assert t.revision == 7 and set(t.models) == {"m", "empty"} and t.models["empty"] == ()
    i1, i2 = t.models["m"]
    assert i1.endpoint == "http://h:1" and i1.enabled and not i2.enabled  # draining: no new requests
    assert t.key_hashes == frozenset({"ab" * 32})
    with pytest.raises(ValueError):
        parse_routes({"revision": 1, "models": [{"instances": []}]})
    with pytest.raises(ValueError):
        parse_routes({"models": []})


def test_keep_missing_and_grace() -> None:
    old = parse_routes(PAYLOAD)
    new = parse_routes({**PAYLOAD, "revision": 8, "models": [{"name": "m", "instances": []}], "api_keys": []})
    merged = keep_missing(old, new)
    assert [i.id for i in merged.models["m"]] == ["i1", "i2"] and merged.models["empty"] == ()
    assert merged.key_hashes == frozenset()  # revocations are never delayed
    g = Grace(since=100.0, revision=8, ttl=6.0)
    assert g.active(103.0, 9)  # within the TTL
    assert g.active(110.0, 8)  # TTL over, revision has not moved
    assert not g.active(110.0, 9)
    assert not g.active(161.0, 8)  # 10 TTLs: over whatever happens


def table_of(revision: int, instances: dict[str, list[str]], cluster: str = "c-1", **extra: object):
    return parse_routes({"revision": revision, "cluster_id": cluster, **extra, "models": [
        {"name": m, "instances": [{"id": i, "endpoint": f"http://h/{i}"} for i in ids]}
        for m, ids in instances.items()]})


def test_judge_table_refuses_another_cluster_and_older_revisions() -> None:
    mem = ClusterMemory("c-1", 100, auth_required=False)
    assert judge_table(mem, table_of(101, {})) is None
    assert judge_table(mem, table_of(100, {})) is None
    assert "below 100" in (judge_table(mem, table_of(99, {})) or "")
    lost = judge_table(mem, table_of(5, {}, cluster="c-2"))
    assert lost and "cluster c-2" in lost and "modelfleet store accept --replaces c-1" in lost
    # An operator accepted the new store: it replaces ours, whatever its revision.
    assert judge_table(mem, table_of(5, {}, cluster="c-2", replaces=["c-0", "c-1"])) is None
    assert judge_table(ClusterMemory(), table_of(1, {}, cluster="c-9")) is None  # first table ever
    assert judge_table(mem, table_of(1, {}, cluster="")) is None  # a controller without identities


def test_remember_keeps_keys_required_until_opened() -> None:
    keyed = table_of(1, {}, api_keys=[{"id": "k", "secret_hash": "ab" * 32}], auth="required")
    served, mem = remember(ClusterMemory(), keyed)
    assert served.auth_required and mem == ClusterMemory("c-1", 1, True)
    # The key table is suddenly empty (a store that lost it, a controller that says "none"):
    empty = table_of(2, {}, auth_required=False, auth="none")
    served, mem = remember(mem, empty)
    assert served.auth_required and served.key_hashes == frozenset() and mem.auth_required
    assert not key_allowed(None, served.key_hashes, served.auth_required)
    # ... also across an accepted store (another cluster id).
    served, mem = remember(mem, table_of(3, {}, cluster="c-2", auth_required=False, auth="none"))
    assert served.auth_required and mem == ClusterMemory("c-2", 3, True)
    # Only an admin's explicit act opens it.
    served, mem = remember(mem, table_of(4, {}, cluster="c-2", auth_required=False, auth="opened"))
    assert not served.auth_required and not mem.auth_required
    assert key_allowed(None, served.key_hashes, served.auth_required)


def test_sudden_loss_is_the_panic_rule_for_routes() -> None:
    four = table_of(1, {"m": ["a", "b", "c"], "n": ["d"]})
    assert sudden_loss(four, table_of(2, {"m": ["a", "b"], "n": ["d"]})) is None  # 1 of 4
    assert sudden_loss(four, table_of(2, {"m": ["a"], "n": ["d"]})) is None  # half: not more than half
    assert sudden_loss(four, table_of(2, {"m": ["a"], "n": []})) == "3 of 4 routable instances would vanish at once"
    assert sudden_loss(four, table_of(2, {"m": [], "n": []})) == "4 of 4 routable instances would vanish at once"
    # A model deleted on purpose does not count; neither do single-instance clusters.
    assert sudden_loss(four, table_of(2, {"n": ["d"]})) is None
    assert sudden_loss(table_of(1, {"m": ["a"]}), table_of(2, {"m": []})) is None
    # Draining instances take no new requests: they are not counted as routable.
    draining = parse_routes({"revision": 1, "models": [{"name": "m", "instances": [
        {"id": i, "endpoint": "http://h", "enabled": i == "a"} for i in ("a", "b", "c")]}]})
    assert sudden_loss(draining, table_of(2, {"m": ["b", "c"]})) is None  # 1 of 1 routable: too few


def test_snapshot_roundtrip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "routes.json"
    assert load_snapshot(path) is None
    save_snapshot(path, PAYLOAD, 123.0)
    table, fetched, memory = load_snapshot(path)  # type: ignore[misc]
    assert fetched == 123.0 and table.revision == 7
    assert memory == ClusterMemory("", 7, True)  # an old snapshot: the memory comes from its table
    # The memory goes with the table: a cluster that required keys still does after a restart,
    # even if the table saved with it says otherwise.
    open_table = {**PAYLOAD, "cluster_id": "c-1", "api_keys": [], "auth_required": False, "auth": "none"}
    save_snapshot(path, open_table, 124.0, ClusterMemory("c-1", 7, auth_required=True))
    table, _, memory = load_snapshot(path)  # type: ignore[misc]
    assert memory == ClusterMemory("c-1", 7, True) and table.auth_required and table.cluster_id == "c-1"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["routes.json"]  # no temp file left
    path.write_text("{garbage")
    assert load_snapshot(path) is None


def test_freshness_and_readiness() -> None:
    f = Freshness()
    assert f.age_s(10.0, True) is None and not is_ready(f, 3)
    f.loaded, f.fresh, f.confirmed_at = True, True, 5.0
    assert f.age_s(10.0, True) == 0.0 and is_ready(f, 0)
    f.fresh = False
    assert f.age_s(10.0, False) == 5.0
    assert is_ready(f, 1) and not is_ready(f, 0)


# -- auth, usage, stats, settings ----------------------------------------------------------------
def test_auth() -> None:
    h = frozenset({hashlib.sha256(b"sekrit").hexdigest()})
    assert key_allowed(None, frozenset(), required=False)
    assert key_allowed(b"Bearer sekrit", h, True) and key_allowed(b"bearer  sekrit ", h, True)
    assert not key_allowed(None, h, True) and not key_allowed(b"Bearer nope", h, True)
    assert not key_allowed(b"sekrit", h, True)
    # Every key revoked: no live hash, but keys were defined, so nothing gets in.
    assert not key_allowed(b"Bearer sekrit", frozenset(), required=True)
    assert not key_allowed(None, frozenset(), required=True)
    assert bearer_token(b"Basic abc") is None and bearer_token(b"Bearer \xff") is None


def test_usage_tokens_and_sse_error() -> None:
    body = b'{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}'
    assert usage_tokens(body) == (12, 34)
    assert usage_tokens(b'{"usage": {"prompt_tokens": 5, "total_tokens": 5}}') == (5, None)
    assert usage_tokens(b"data: [DONE]") == (None, None)
    ev = sse_error("broken", "upstream_stream_broken")
    assert ev.startswith(b'data: {"error":{') and ev.endswith(b"\n\n")


def test_recent_stats_ring() -> None:
    s = RecentStats(bucket_s=10, buckets=3)
    s.add("m", 200, 100.0)
    s.add("m", 404, 101.0)
    s.add("m", 503, 111.0)
    s.add("m", 429, 112.0)
    series = s.series("m", 115.0)
    assert [b["requests"] for b in series] == [0, 2, 2]
    assert series[1]["client_errors"] == 1 and series[2]["errors"] == 2
    s.add("m", 200, 140.0)  # 3 buckets later: the old ones are reused, not summed
    assert [b["requests"] for b in s.series("m", 140.0)] == [0, 0, 1]
    assert [outcome(x) for x in (200, 400, 429, 500)] == [0, 1, 2, 2]


def test_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))
    s = GatewaySettings(controllers="a:1, http://b:2/")
    assert s.controller_list == ["http://a:1", "http://b:2"]
    assert s.snapshot == tmp_path / "gateway-routes.json"
    assert GatewaySettings(snapshot_path="").snapshot is None
    e = GatewaySettings.from_env({"MODELFLEET_CONTROLLER": "x:1", "MODELFLEET_QUEUE_LEN": "7",
                                  "MODELFLEET_RETRY_BUDGET_S": "2.5"}, port=9)
    assert (e.controller_list, e.queue_len, e.retry_budget_s, e.port) == (["http://x:1"], 7, 2.5, 9)
    with pytest.raises(ValueError):
        GatewaySettings(max_attempts=0)


# -- pool: queue and ejection bookkeeping (asyncio, no sockets) -----------------------------------
def pool_with(max_concurrency: int = 1, n: int = 1, **settings: object) -> tuple[Pool, list[str]]:
    events: list[str] = []
    values: dict[str, object] = {"snapshot_path": "", "queue_len": 2, "queue_wait_s": 1.0, "eject_cooldown_s": 0.2,
                                 **settings}
    s = GatewaySettings(**values)  # type: ignore[arg-type]
    p = Pool(s, report=lambda i, e, _r: events.append(f"{e}:{i}"), rng=random.Random(0))
    p.apply(parse_routes({"revision": 1, "models": [{"name": "m", "instances": [
        {"id": f"i{k}", "endpoint": f"http://h:{k}", "max_concurrency": max_concurrency} for k in range(n)]}]}))
    return p, events


async def test_queue_hands_over_in_order_and_overflows() -> None:
    p, _ = pool_with()
    m = p.models["m"]
    first = await p.acquire(m)
    w1 = asyncio.create_task(p.acquire(m))
    w2 = asyncio.create_task(p.acquire(m))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as exc:
        await p.acquire(m)  # queue of 2 is full
    assert exc.value.retry_after >= 1
    p.release(first)
    assert (await w1) is first and not w2.done() and first.in_flight == 1
    p.release(first)
    assert (await w2) is first
    p.release(first)
    assert first.in_flight == 0 and not m.waiters


async def test_queue_wait_times_out_and_cancel_frees_the_place() -> None:
    p, _ = pool_with(queue_wait_s=0.1)
    m = p.models["m"]
    inst = await p.acquire(m)
    with pytest.raises(Overloaded):
        await p.acquire(m)
    waiter = asyncio.create_task(p.acquire(m, wait_s=5))
    await asyncio.sleep(0)
    waiter.cancel()  # the client went away while queued
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not m.waiters
    p.release(inst)
    assert inst.in_flight == 0


async def test_handover_and_cancel_race_gives_the_slot_back() -> None:
    p, _ = pool_with()
    m = p.models["m"]
    inst = await p.acquire(m)
    waiter = asyncio.create_task(p.acquire(m))
    await asyncio.sleep(0)
    p.release(inst)  # handed to the waiter (in_flight stays 1) ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert inst.in_flight == 0


async def test_ejection_cooldown_grows_and_restores() -> None:
    p, events = pool_with(n=2, max_concurrency=4)
    m = p.models["m"]
    i0 = p.instances["i0"]
    for _ in range(3):
        p.failed(i0, "HTTP 503")
    assert i0.ejected(asyncio.get_running_loop().time()) and events == ["ejected:i0"]
    assert all(p.try_acquire(m) is p.instances["i1"] for _ in range(3))  # traffic moved
    await asyncio.sleep(0.3)
    assert events == ["ejected:i0", "restored:i0"]
    for _ in range(3):
        p.failed(i0, "HTTP 503")
    first_cooldown = 0.2
    assert i0.ejections == 2 and i0.ejected_until - asyncio.get_running_loop().time() > 1.5 * first_cooldown
    p.succeeded(i0, 0.1)
    assert i0.failures == 0


async def test_apply_keeps_counts_and_fails_waiters_of_removed_models() -> None:
    p, _ = pool_with()
    m = p.models["m"]
    inst = await p.acquire(m)
    waiter = asyncio.create_task(p.acquire(m))
    await asyncio.sleep(0)
    p.apply(parse_routes({"revision": 2, "models": [{"name": "m", "instances": [
        {"id": "i0", "endpoint": "http://h:0", "max_concurrency": 1, "enabled": False}]}]}))
    assert p.instances["i0"] is inst and inst.in_flight == 1 and not inst.enabled
    p.apply(parse_routes({"revision": 3, "models": []}))
    with pytest.raises(NoInstance):
        await waiter
    p.release(inst)  # a request in flight on a removed instance still finishes cleanly
    assert inst.in_flight == 0 and isinstance(inst, Inst)
    assert EMPTY.revision == -1


async def test_requests_waiting_on_a_removed_instance_are_cut_loose() -> None:
    """An instance leaves the table (its worker stopped heartbeating): attempts still waiting
    for its answer expire at once, so the proxy fails them over; other instances' do not."""
    p, _ = pool_with(n=2)
    gone, stays = p.instances["i0"], p.instances["i1"]

    async def waiting_on(inst: Inst) -> str:
        try:
            async with asyncio.timeout(None) as scope:
                inst.aborts.add(scope)
                await asyncio.sleep(30)  # a vanished machine answers nothing
        except TimeoutError:
            return "cut loose"
        finally:
            inst.aborts.discard(scope)
        return "answered"

    t_gone, t_stays = asyncio.create_task(waiting_on(gone)), asyncio.create_task(waiting_on(stays))
    await asyncio.sleep(0.01)
    p.apply(parse_routes({"revision": 2, "models": [{"name": "m", "instances": [
        {"id": "i1", "endpoint": "http://h:1", "max_concurrency": 1}]}]}))
    assert await asyncio.wait_for(t_gone, 1) == "cut loose"
    await asyncio.sleep(0.05)
    assert not t_stays.done()
    t_stays.cancel()


async def test_apply_holds_a_sudden_loss_until_the_revision_moves_after_a_ttl() -> None:
    from modelfleet.gateway.api import GatewayApp

    app = GatewayApp(GatewaySettings(controllers="", snapshot_path=""))
    ttl = 0.3
    key = [{"id": "k", "secret_hash": "ab" * 32}]

    def served() -> set[str]:
        return {i.id for insts in app.table.models.values() for i in insts}

    app._apply(table_of(1, {"m": ["a", "b", "c"]}, heartbeat_ttl=ttl, api_keys=key))
    app._apply(table_of(2, {"m": ["a"]}, heartbeat_ttl=ttl, api_keys=[]))  # 2 of 3 vanish at once: held
    assert served() == {"a", "b", "c"} and app.table.revision == 2
    assert app.table.key_hashes == frozenset()  # keys follow at once: a revocation is never delayed
    await asyncio.sleep(ttl + 0.2)
    assert served() == {"a", "b", "c"}  # a TTL has passed, but the revision has not moved since
    app._apply(table_of(3, {"m": ["a"]}, heartbeat_ttl=ttl))  # moved, still gone: believed
    assert served() == {"a"}
    app._apply(table_of(4, {"m": ["a", "b"]}, heartbeat_ttl=ttl))
    app._apply(table_of(5, {"m": ["b"]}, heartbeat_ttl=ttl))  # 1 of 2: not more than half, believed at once
    assert served() == {"b"}
    # The hold also ends on its own when the revision moved during the TTL.
    app._apply(table_of(6, {"m": ["a", "b", "c", "d"]}, heartbeat_ttl=ttl))
    app._apply(table_of(7, {"m": []}, heartbeat_ttl=ttl))
    app._apply(table_of(8, {"m": ["d"]}, heartbeat_ttl=ttl))
    assert served() == {"a", "b", "c", "d"}
    await asyncio.sleep(ttl + 0.2)
    assert served() == {"d"} and app.table.revision == 8
    app.proxy.stop()
