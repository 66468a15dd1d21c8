"""Prefix-cache-aware routing: send a prompt where its prefix's KV cache already is.

Three parts, the first and last pure:

1. ``request_key``: the prompt as the model will see it, in a canonical byte form, cut into
   blocks on a fixed schedule, with a running hash at each block's end (block i's value
   covers blocks 0..i). Chat:
   the tools first (chat templates put them into the system prompt), then every message in
   order, each rendered on its own (JSON, sorted keys), so turn n+1 of a conversation starts
   with exactly the bytes of turn n and extends its chain; the response format last (it is
   a decoding constraint in llama.cpp and vLLM, not prompt text: it must not break the
   prefix). Completions: the prompt text (or token ids). Embeddings: no key (no KV cache
   to hit). Only full blocks count: a prompt shorter than one block has nothing worth
   steering.

2. ``PrefixIndex``: per model, what THIS gateway sent where: block hash -> {instance: last
   time}. Bounded (LRU on blocks) and expiring (ttl), so stale beliefs fade; nothing is
   shared between gateways, so nothing on the request path waits for another process.

3. ``pick``: given the candidates (with this gateway's in-flight counts), the number of
   leading blocks each is believed to hold, and the request's anchor, order them by
   (matched blocks, rendezvous score of the anchor) and take the first whose load stays
   within ``bound`` times the least loaded one's, plus ``slack`` (bounded-load consistent
   hashing, measured against the least loaded rather than the mean, as SGLang's and vLLM's
   cache-aware routers do). A prefix nobody has seen goes to its rendezvous
   winner, the same instance in every gateway: active-active gateways keep affinity without
   talking. When the winner is too busy, the next in that same order takes it, so a hot
   prefix spreads to a consistent second home rather than to a random one.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from modelfleet.gateway.balancer import Candidate, rendezvous_score

ROUTING_MODES = ("p2c", "prefix")

# Block sizes: 256 bytes (~64 tokens of English) over the first 4 KiB (~1,000 tokens, where
# system prompts and early turns split), 1 KiB beyond: an 8k-token prompt is ~55 blocks, so
# hashing it costs tens of microseconds (each block is a Python-level step). The schedule is
# fixed, so every gateway cuts every prompt the same way.
BLOCK_BYTES = 256
FINE_BYTES = 4096
COARSE_BLOCK_BYTES = 1024
# The rendezvous anchor is the chain's value at block ANCHOR_BLOCKS (or its last, if
# shorter): requests that share ~1 KiB of prompt share their home. One block would put every
# request that starts with the same boilerplate sentence on one instance.
ANCHOR_BLOCKS = 4
# Prompts are keyed on at most their first 1 MiB (~250k tokens, beyond any context window).
MAX_KEY_BYTES = 1 << 20

C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True, slots=True)
class PrefixKey:
    """A request's block chain (hashes of the prefix up to and including each block)."""

    chain: tuple[int, ...]

    @property
    def anchor(self) -> bytes:
        """What the rendezvous hash of a prefix with no history is computed over."""
        return self.chain[min(len(self.chain), ANCHOR_BLOCKS) - 1].to_bytes(8, "big")


# -- 1. keys ---------------------------------------------------------------------------------
_DUMP_OPTS = orjson.OPT_SORT_KEYS


def render_chat(req: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a chat request's prompt: tools, messages in order, response format.

    Each part is rendered alone and the parts joined with a separator, so a conversation's
    next turn begins with the bytes of the previous one."""
    parts = []
    tools = req.get("tools")
    if tools:
        parts.append(b"T" + orjson.dumps(tools, option=_DUMP_OPTS))
    for msg in req.get("messages") or ():
        parts.append(b"M" + orjson.dumps(msg, option=_DUMP_OPTS))
    rf = req.get("response_format")
    if rf:
        parts.append(b"F" + orjson.dumps(rf, option=_DUMP_OPTS))
    return b"\x1e".join(parts)


def render_completion(req: Mapping[str, Any]) -> bytes | None:
    """The prompt of a completions request: its text, or its token ids; the first of a batch."""
    p = req.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        p = p[0]  # a batch: steer by its first prompt
    if isinstance(p, str):
        return p.encode()
    if isinstance(p, list) and p and all(type(t) is int for t in p):
        return b"I" + orjson.dumps(p)
    return None


def block_ends(size: int) -> range | list[int]:
    """Where the full blocks of a ``size``-byte prompt end."""
    fine = range(BLOCK_BYTES, min(size, FINE_BYTES) + 1, BLOCK_BYTES)
    if size < FINE_BYTES + COARSE_BLOCK_BYTES:
        return fine
    return [*fine, *range(FINE_BYTES + COARSE_BLOCK_BYTES, size + 1, COARSE_BLOCK_BYTES)]


def chain_hashes(data: bytes | memoryview) -> tuple[int, ...]:
    """Chained hashes of the full blocks of ``data``: at each block's end, a 64-bit value of
    every byte up to it (CRC-32 and Adler-32, both running: each call extends the last, so
    the chain is one pass over the prompt in C). Not cryptographic and needs not be: a
    collision only misleads one routing guess, and a client can pick its instance with
    X-Session-ID anyway."""
    out = []
    c, a, start = 0, 1, 0
    mv = memoryview(data)
    crc32, adler32 = zlib.crc32, zlib.adler32
    for end in block_ends(len(data)):
        b = mv[start:end]
        c = crc32(b, c)
        a = adler32(b, a)
        out.append(c << 32 | a)
        start = end
    return tuple(out)


def request_key(endpoint: str, req: Mapping[str, Any]) -> PrefixKey | None:
    """The key of a validated request body, or None (embeddings, prompts under one block).

    A key only steers: a body it cannot render gets none (P2C), never an error. Only the
    first MAX_KEY_BYTES count, so a huge body costs bounded time on the event loop."""
    try:
        if endpoint == "chat":
            data: bytes | None = render_chat(req)
        elif endpoint == "completions":
            data = render_completion(req)
        else:
            return None
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        return None
    if not data:
        return None
    chain = chain_hashes(memoryview(data)[:MAX_KEY_BYTES])
    return PrefixKey(chain) if chain else None


# -- 2. the index ----------------------------------------------------------------------------
class PrefixIndex:
    """Which instance this gateway sent which block to, and when. One per model.

    ``max_blocks`` bounds memory (about 200 bytes a block: 32,768 blocks, ~7 MB, is 2M
    tokens of distinct prompt); the least recently sent blocks go first. An entry older
    than ``ttl_s`` is not believed: the instance has likely evicted it."""

    __slots__ = ("blocks", "clock", "max_blocks", "ttl_s")

    def __init__(
        self, max_blocks: int = 32768, ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.blocks: OrderedDict[int, dict[str, float]] = OrderedDict()
        self.max_blocks = max_blocks
        self.ttl_s = ttl_s
        self.clock = clock

    def __len__(self) -> int:
        return len(self.blocks)

    def matched(self, key: PrefixKey, instance_ids: Sequence[str]) -> dict[str, int]:
        """For each of ``instance_ids``: how many leading blocks of ``key`` it was sent
        within the ttl.

        A binary search per instance, not a walk: "was sent block i" holds for every block
        up to some depth and for none beyond. A block's value stands for its whole prefix,
        so every request that touched block i touched blocks 0..i-1 at the same time, and
        ``record`` touches a chain deepest first, so LRU eviction takes deep blocks first."""
        chain = key.chain
        blocks = self.blocks
        first = blocks.get(chain[0])
        if not first:
            return dict.fromkeys(instance_ids, 0)
        oldest = self.clock() - self.ttl_s
        out = {}
        for i in instance_ids:
            if first.get(i, -math.inf) < oldest:
                out[i] = 0
                continue
            lo, hi = 1, len(chain)  # block lo-1 was sent to i
            while lo < hi:
                mid = (lo + hi + 1) // 2
                holders = blocks.get(chain[mid - 1])
                if holders is not None and holders.get(i, -math.inf) >= oldest:
                    lo = mid
                else:
                    hi = mid - 1
            out[i] = lo
        return out

    def record(self, key: PrefixKey, instance_id: str) -> None:
        now = self.clock()
        blocks = self.blocks
        for h in reversed(key.chain):  # deepest first: the shallow blocks stay the most recent
            holders = blocks.get(h)
            if holders is None:
                blocks[h] = {instance_id: now}
            else:
                holders[instance_id] = now
                blocks.move_to_end(h)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def forget(self, keep: set[str]) -> None:
        """Drop what was sent to instances no longer in ``keep`` (they left the route table)."""
        for h in list(self.blocks):
            holders = self.blocks[h]
            for i in [i for i in holders if i not in keep]:
                del holders[i]
            if not holders:
                del self.blocks[h]


# -- 3. the policy ---------------------------------------------------------------------------
def within_bound(c: Candidate, least: Candidate, bound: float, slack: int = 0) -> bool:
    """``c`` may take one more request: its in-flight count (per unit of weight) is at most
    ``bound`` times the least loaded one's, plus ``slack`` requests. With no slack a holder
    that is busy while another instance idles gives the request away: on a runner that
    serves one request at a time a second one waits out the whole first, and measured, a
    slack of one piled every group of a run onto one replica (docs/gateway.md). A batching
    runner (vLLM, llama-server slots) can take a slack of a few. The least loaded always
    passes, so the bound never refuses everyone."""
    return c.in_flight * least.weight <= (bound * least.in_flight + slack) * c.weight


def pick(cands: Sequence[C], matched: Mapping[str, int], anchor: bytes, bound: float, slack: int = 0) -> C:
    """The instance for a keyed request among non-empty ``cands`` (routable, with room).

    Longest believed prefix first, then the anchor's rendezvous order; the first within the
    load bound wins, else the least loaded (weighted)."""
    return pick_why(cands, matched, anchor, bound, slack)[0]


def pick_why(
    cands: Sequence[C], matched: Mapping[str, int], anchor: bytes, bound: float, slack: int = 0
) -> tuple[C, str]:
    """``pick``, with why: "cached" (the instance believed to hold the most of the prefix),
    "home" (nobody holds any: the rendezvous home), "spilled" (the preferred one was over
    the load bound)."""
    least = min(cands, key=lambda c: c.in_flight / c.weight)
    order = sorted(cands, key=lambda c: (matched.get(c.id, 0), rendezvous_score(anchor, c.id, c.weight)), reverse=True)
    for n, c in enumerate(order):
        if within_bound(c, least, bound, slack):
            return c, ("spilled" if n else "cached" if matched.get(c.id, 0) else "home")
    return least, "spilled"  # not reached: the least loaded is within the bound
