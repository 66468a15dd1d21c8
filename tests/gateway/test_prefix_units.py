"""Prefix-aware routing without sockets: prompt keys, the index, the bounded-load policy, two
gateways deciding alone, and the routing field from deployment to route table."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pydantic
import pytest

from modelfleet.controller.routes import build_route_table, model_routing
from modelfleet.gateway import balancer, prefix
from modelfleet.gateway.pool import Inst, Pool
from modelfleet.gateway.prefix import BLOCK_BYTES, PrefixIndex, PrefixKey, pick, request_key, within_bound
from modelfleet.gateway.routes import parse_routes
from modelfleet.gateway.settings import GatewaySettings
from modelfleet.models import Deployment, DeploymentSpec
from modelfleet.store.base import ClusterMeta


@dataclass
class C:
    id: str
    weight: int = 100
    max_concurrency: int = 1000
    in_flight: int = 0
    enabled: bool = True
    ejected_until: float = 0.0


SYSTEM = "You are the support assistant of ACME. " * 30  # ~1,100 characters, 4+ blocks


def system_of(group: int) -> str:
    return f"[group {group}] " + SYSTEM


def chat(system: str, *turns: str, **extra: object) -> dict[str, object]:
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"model": "m", "messages": msgs, **extra}


def key_of(req: dict[str, object], endpoint: str = "chat") -> PrefixKey:
    k = request_key(endpoint, req)
    assert k is not None
    return k


# -- keys --------------------------------------------------------------------------------------
def test_a_follow_up_turn_extends_the_chain_of_the_turn_before() -> None:
    t1 = key_of(chat(SYSTEM, "What are your opening hours? " * 5))
    t2 = key_of(chat(SYSTEM, "What are your opening hours? " * 5, "From 9 to 5. " * 10, "And on Sundays?"))
    assert len(t2.chain) > len(t1.chain) >= 4
    assert t2.chain[: len(t1.chain)] == t1.chain  # every full block of turn 1 is a block of turn 2
    assert t1.anchor == t2.anchor


def test_keys_differ_where_the_prompt_differs_and_ignore_json_key_order() -> None:
    a = key_of(chat(system_of(1), "q"))
    b = key_of(chat(system_of(2), "q"))
    assert a.chain[0] != b.chain[0]
    # The same message with its keys in another order is the same prompt.
    swapped = {
        "model": "m",
        "messages": [{"content": system_of(1), "role": "system"}, {"content": "q", "role": "user"}],
    }
    assert key_of(swapped) == a
    # Tools are part of the prompt (chat templates put them in the system turn): all differs.
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    t = key_of(chat(system_of(1), "q", tools=tools))
    assert t.chain[0] != a.chain[0]
    # The response format is a decoding constraint, rendered last: the messages' prefix stays.
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    f = key_of(chat(system_of(1), "q" * 300, response_format=fmt))
    plain = key_of(chat(system_of(1), "q" * 300))
    assert f.chain[: len(plain.chain)] == plain.chain


def test_what_has_no_key() -> None:
    assert request_key("embeddings", {"model": "m", "input": SYSTEM}) is None
    assert request_key("chat", chat("short", "hi")) is None  # under one block: nothing to steer
    assert request_key("completions", {"model": "m", "prompt": "x" * (BLOCK_BYTES - 1)}) is None
    assert request_key("completions", {"model": "m", "prompt": [{"bad": 1}]}) is None
    assert request_key("chat", {"model": "m", "messages": 5}) is None  # never an error: no key
    huge = key_of({"prompt": "y" * (3 << 20)}, "completions")  # keyed on its first MiB only
    assert huge == key_of({"prompt": "y" * (1 << 20) + "z" * 100}, "completions")


def test_completion_prompts_text_tokens_and_batches() -> None:
    text = key_of({"prompt": SYSTEM + "tail"}, "completions")
    assert key_of({"prompt": SYSTEM + "other tail"}, "completions").chain[:4] == text.chain[:4]
    assert key_of({"prompt": [SYSTEM + "tail", "second"]}, "completions") == text  # a batch: its first prompt
    toks = key_of({"prompt": list(range(200))}, "completions")
    assert key_of({"prompt": [list(range(200)), [1]]}, "completions") == toks
    assert key_of({"prompt": list(range(300))}, "completions").chain[: len(toks.chain)] == toks.chain


def test_block_schedule_is_the_same_cut_for_every_length() -> None:
    """A longer prompt's blocks start with exactly the shorter one's: keys extend, never shift."""
    ends = {n: list(prefix.block_ends(n)) for n in range(0, 12000, 37)}
    for n, e in ends.items():
        assert all(x <= n for x in e) and (not e or n - e[-1] < prefix.COARSE_BLOCK_BYTES)
        for m in range(n, 12000, 37 * 13):
            assert ends[m][: len(e)] == e
    long = key_of(chat(SYSTEM * 8, "and a question"))  # ~9 KB: fine blocks, then coarse ones
    assert 16 < len(long.chain) < 9400 // 256


# -- the index ---------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_index_matches_the_longest_prefix_each_instance_was_sent() -> None:
    idx = PrefixIndex()
    t1 = key_of(chat(SYSTEM, "question one " * 40))
    t2 = key_of(chat(SYSTEM, "question one " * 40, "answer " * 40, "follow-up " * 40))
    other = key_of(chat(SYSTEM, "question two " * 40))
    idx.record(t1, "a")
    idx.record(other, "b")
    m = idx.matched(t2, ["a", "b", "c"])
    shared = sum(1 for x, y in zip(t1.chain, other.chain, strict=False) if x == y)
    assert m == {"a": len(t1.chain), "b": shared, "c": 0}
    assert 0 < shared < len(t1.chain)


def test_index_expires_is_bounded_and_forgets_instances_that_left() -> None:
    clock = Clock()
    idx = PrefixIndex(max_blocks=10, ttl_s=60, clock=clock)
    k = key_of(chat(SYSTEM, "q" * 3000))  # more than 10 blocks
    assert len(k.chain) > 10
    idx.record(k, "a")
    assert len(idx) == 10  # the deepest blocks went first: shallow ones are shared by more prompts
    assert idx.matched(k, ["a"]) == {"a": 10}
    small = key_of(chat(system_of(3), "q"))
    idx.record(small, "a")
    assert idx.matched(small, ["a"])["a"] == len(small.chain)
    clock.t += 61
    assert idx.matched(small, ["a"]) == {"a": 0}
    idx.record(small, "b")
    idx.forget({"a"})
    assert idx.matched(small, ["a", "b"]) == {"a": 0, "b": 0}


def test_index_binary_search_agrees_with_a_walk_under_eviction_and_expiry() -> None:
    clock = Clock()
    idx = PrefixIndex(max_blocks=60, ttl_s=30, clock=clock)
    rng = random.Random(9)
    keys = [key_of(chat(system_of(g % 3), "turn " * (40 * (1 + g // 3)))) for g in range(12)]  # nested prefixes

    def walk(k: PrefixKey, i: str) -> int:
        depth = 0
        for h in k.chain:
            holders = idx.blocks.get(h)
            if not holders or holders.get(i, -1e18) < clock.t - 30:
                break
            depth += 1
        return depth

    for _ in range(400):
        clock.t += rng.random() * 3
        idx.record(rng.choice(keys), rng.choice("abc"))
        k = rng.choice(keys)
        assert idx.matched(k, ["a", "b", "c"]) == {i: walk(k, i) for i in "abc"}


# -- the policy --------------------------------------------------------------------------------
def test_bound_always_admits_the_least_loaded_and_a_holder_its_second_request() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        cands = [C(f"i{j}", weight=rng.choice([50, 100, 300]), in_flight=rng.randrange(20)) for j in range(4)]
        least = min(cands, key=lambda c: c.in_flight / c.weight)
        assert within_bound(least, least, 1.0)
    idle, holder = C("idle"), C("holder", in_flight=1)
    # Busy while another idles: give it away (a one-at-a-time runner would queue it) ...
    assert not within_bound(holder, idle, 1.25)
    assert within_bound(holder, idle, 1.25, slack=1)  # ... unless the runner batches (slack)
    holder.in_flight, idle.in_flight = 5, 4
    assert within_bound(holder, idle, 1.25) and not within_bound(C("x", in_flight=6), idle, 1.25)
    heavy = C("heavy", weight=200, in_flight=2)  # twice the weight carries twice the load
    assert within_bound(heavy, C("light", in_flight=1), 1.0)


def test_a_new_prefix_goes_to_its_rendezvous_home() -> None:
    cands = [C(f"i{j}") for j in range(4)]
    k = key_of(chat(SYSTEM, "q"))
    home = balancer.pinned(k.anchor, cands)
    assert pick(cands, {}, k.anchor, 1.25) is home


def test_hot_prefix_spreads_within_the_bound_to_a_consistent_second_home() -> None:
    cands = [C(f"i{j}") for j in range(4)]
    k = key_of(chat(SYSTEM, "hot"))
    order = sorted(cands, key=lambda c: balancer.rendezvous_score(k.anchor, c.id, c.weight), reverse=True)
    picks = []
    for _ in range(40):  # requests that stay in flight
        c = pick(cands, {}, k.anchor, 1.25)
        assert c.in_flight <= 1.25 * min(x.in_flight for x in cands)
        c.in_flight += 1
        picks.append(c.id)
    # The overflow's first stop is the prefix's second rendezvous choice, not a random one.
    assert picks[:2] == [order[0].id, order[1].id]
    counts = Counter(picks)
    assert counts[order[0].id] == max(counts.values())
    assert max(counts.values()) / (40 / 4) <= 1.25
    # With a slack of one (a batching runner) the home keeps a second request.
    for c in cands:
        c.in_flight = 0
    first, second = pick(cands, {}, k.anchor, 1.25, 1), None
    first.in_flight += 1
    second = pick(cands, {}, k.anchor, 1.25, 1)
    assert first is second is order[0]


def test_skewed_load_moves_a_prefix_off_its_busy_holder() -> None:
    k = key_of(chat(SYSTEM, "q"))
    a, b = C("a", in_flight=6), C("b", in_flight=0)
    # a holds the prefix, but 6 in flight against 0 is beyond 1.25 x its share of 7.
    assert pick([a, b], {"a": 5}, k.anchor, 1.25) is b
    a.in_flight = b.in_flight = 1  # equally busy: the cache wins
    assert pick([a, b], {"a": 5}, k.anchor, 1.25) is a
    b.in_flight = 0  # busy while the other idles: the other takes it, unless a slack allows
    assert pick([a, b], {"a": 5}, k.anchor, 1.25) is b
    assert pick([a, b], {"a": 5}, k.anchor, 1.25, slack=1) is a
    # The longest match wins over the rendezvous home.
    home = balancer.pinned(k.anchor, [a, b])
    other = b if home is a else a
    a.in_flight = b.in_flight = 0
    assert pick([a, b], {other.id: 2, home.id: 1}, k.anchor, 1.25) is other


def test_instances_joining_and_leaving_move_only_their_share_of_prefixes() -> None:
    keys = [key_of(chat(system_of(g), "q")) for g in range(400)]
    four = [C(f"i{j}") for j in range(4)]
    before = {i: pick(four, {}, k.anchor, 1.25).id for i, k in enumerate(keys)}
    five = [*four, C("i4")]
    after = {i: pick(five, {}, k.anchor, 1.25).id for i, k in enumerate(keys)}
    moved = [i for i in before if before[i] != after[i]]
    assert all(after[i] == "i4" for i in moved)  # a join takes prefixes only to itself
    assert 40 <= len(moved) <= 130  # about a fifth of them
    three = [c for c in four if c.id != "i2"]
    left = {i: pick(three, {}, k.anchor, 1.25).id for i, k in enumerate(keys)}
    assert all(left[i] == before[i] for i in before if before[i] != "i2")  # a leave moves only its own


def settings() -> GatewaySettings:
    return GatewaySettings(snapshot_path="")


def table(routing: str = "prefix", ids: tuple[str, ...] = ("a", "b", "c")):  # type: ignore[no-untyped-def]
    return parse_routes(
        {
            "revision": 1,
            "models": [
                {
                    "name": "m",
                    "routing": routing,
                    "instances": [{"id": i, "endpoint": f"http://{i}", "max_concurrency": 64} for i in ids],
                }
            ],
        }
    )


def test_two_gateways_deciding_alone_agree_on_every_group() -> None:
    gws = [Pool(settings(), rng=random.Random(s)) for s in (1, 2)]
    for g in gws:
        g.apply(table())
    rng = random.Random(7)
    seen: dict[int, set[str]] = {}
    for n in range(600):
        group = rng.randrange(12)
        gw = gws[rng.randrange(2)]
        k = key_of(chat(system_of(group), f"question {n} " * rng.randrange(1, 30)))
        inst = gw.try_acquire(gw.models["m"], key=k)
        assert isinstance(inst, Inst)
        seen.setdefault(group, set()).add(inst.id)
        gw.release(inst)  # one at a time: what is tested here is agreement, not the load bound
    assert all(len(ids) == 1 for ids in seen.values()), seen
    assert len({next(iter(ids)) for ids in seen.values()}) == 3  # and the groups use every instance


def test_pool_prefix_routing_follows_history_session_wins_and_p2c_ignores_keys() -> None:
    pool = Pool(settings(), rng=random.Random(0))
    pool.apply(table())
    m = pool.models["m"]
    assert m.prefixes is not None
    k = key_of(chat(system_of(1), "q"))
    first = pool.try_acquire(m, key=k)
    assert isinstance(first, Inst)
    # The home is excluded (a failed attempt): the retry goes elsewhere and is remembered there.
    retry = pool.try_acquire(m, exclude=(first.id,), key=k)
    assert isinstance(retry, Inst) and retry is not first
    pool.release(first)
    pool.release(retry)
    assert m.prefixes.matched(k, [first.id, retry.id]) == {first.id: len(k.chain), retry.id: len(k.chain)}
    # An explicit session id wins over the prefix.
    sessions = {pool.try_acquire(m, session=b"s%d" % i, key=k).id for i in range(30)}  # type: ignore[union-attr]
    assert len(sessions) == 3
    for inst in pool.instances.values():
        inst.in_flight = 0
    # Switched to p2c by the route table: the index is dropped and keys are ignored.
    pool.apply(table("p2c"))
    assert m.prefixes is None
    spread = {pool.try_acquire(m, key=k).id for _ in range(30)}  # type: ignore[union-attr]
    assert len(spread) == 3


def test_an_instance_leaving_the_table_is_forgotten() -> None:
    pool = Pool(settings(), rng=random.Random(0))
    pool.apply(table())
    m = pool.models["m"]
    k = key_of(chat(system_of(1), "q"))
    inst = pool.try_acquire(m, key=k)
    assert isinstance(inst, Inst)
    pool.release(inst)
    pool.apply(table(ids=tuple(i for i in ("a", "b", "c") if i != inst.id)))
    assert m.prefixes is not None and m.prefixes.matched(k, [inst.id]) == {inst.id: 0}


# -- the routing field -------------------------------------------------------------------------
def test_unknown_routing_in_a_table_is_served_as_p2c() -> None:
    t = parse_routes(
        {"revision": 1, "models": [{"name": "x", "routing": "magic", "instances": []}, {"name": "y", "instances": []}]}
    )
    assert t.routing == {"x": "p2c", "y": "p2c"}


def test_deployment_routing_is_validated_and_carried_to_the_route_table() -> None:
    with pytest.raises(pydantic.ValidationError):
        DeploymentSpec(name="m", source="x", routing="random")  # type: ignore[arg-type]
    assert DeploymentSpec(name="m", source="x").routing == "auto"
    deps = [
        Deployment(name="chat", source="x"),
        Deployment(name="emb", backend="sentence-transformers", source="y"),
        Deployment(name="plain", source="z", routing="p2c"),
        Deployment(name="forced", backend="sentence-transformers", source="y", routing="prefix"),
        Deployment(name="picked", source="y", routing="prefix"),
    ]
    payload = build_route_table(
        revision=1,
        store_time=0,
        controller_id="c",
        ttl=6,
        alive=set(),
        instances=[],
        deployments=deps,
        api_keys=[],
        meta=ClusterMeta(cluster_id="k", auth="none"),
    )
    assert parse_routes(payload).routing == {
        "chat": "p2c",  # auto: P2C until a benchmark bears prefix routing out (docs/gateway.md)
        "emb": "p2c",
        "plain": "p2c",
        "forced": "p2c",  # embeddings never have a key
        "picked": "prefix",
    }
    assert model_routing("prefix", None) == "prefix"  # an attached server of unknown kind
    assert model_routing("auto", None) == "p2c"


def test_settings_refuse_a_bound_below_one() -> None:
    with pytest.raises(ValueError):
        GatewaySettings(snapshot_path="", prefix_load_bound=0.9)
    assert prefix.ROUTING_MODES == ("p2c", "prefix")
