"""Choosing an instance: pure functions over instance snapshots, no I/O, no mutation.

Least outstanding requests with power-of-two choices (P2C): draw two distinct candidates
with probability proportional to their weight and keep the one with fewer requests in
flight per unit of weight. On a tie the first draw wins, so that at low load (everything
idle, every comparison a tie) traffic splits in proportion to the weights; under load the
in-flight comparison moves traffic away from slow or busy instances. P2C rather than a
full scan for the minimum: several gateways share the instances without sharing counts,
and a full scan makes them all pick the same "least busy" instance at once (herding).

Session affinity (X-Session-ID): rendezvous hashing, weighted, picks the same instance for
a session in every gateway and moves only that instance's sessions when it leaves. It
yields to load when the pinned instance is full or much busier than the least busy one.

Prefix routing (a model deployed with routing "prefix", see prefix.py): a request with a
prompt key goes where its prefix was sent before (or to its rendezvous home), within a load
bound; the caller passes that policy in as ``keyed``, bound to the request's key. A session
id wins over it: the client asked for that instance explicitly.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What the balancer reads of an instance (gateway.pool.Inst satisfies it)."""

    id: str
    weight: int
    max_concurrency: int
    in_flight: int
    enabled: bool
    ejected_until: float


C = TypeVar("C", bound=Candidate)


class Verdict:
    """Why no instance was chosen."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# Every eligible instance is at max_concurrency: queue the request.
ALL_FULL = Verdict("ALL_FULL")
# No instance may take new requests (none, all disabled/draining, or all tried already).
NO_INSTANCE = Verdict("NO_INSTANCE")


def routable(c: Candidate) -> bool:
    """Takes new requests at all: enabled (not draining) and a positive weight."""
    return c.enabled and c.weight > 0


def eligible(candidates: Sequence[C], now: float, exclude: Collection[str] = ()) -> list[C]:
    """Routable, not excluded, not ejected. When every routable one is ejected, all of them
    (panic mode, as Envoy does): an ejection may be stale, and trying beats a sure 503."""
    pool = [c for c in candidates if routable(c) and c.id not in exclude]
    healthy = [c for c in pool if c.ejected_until <= now]
    return healthy if healthy else pool


def has_room(c: Candidate) -> bool:
    return c.in_flight < c.max_concurrency


def less_loaded(a: Candidate, b: Candidate) -> bool:
    """a.in_flight / a.weight <= b.in_flight / b.weight, without division."""
    return a.in_flight * b.weight <= b.in_flight * a.weight


def _draw(cands: Sequence[C], rng: random.Random, skip: int = -1) -> int:
    """Index of a weighted random draw, never ``skip``."""
    total = sum(c.weight for i, c in enumerate(cands) if i != skip)
    r = rng.random() * total
    last = -1
    for i, c in enumerate(cands):
        if i == skip:
            continue
        last = i
        r -= c.weight
        if r < 0:
            return i
    return last  # float rounding: the last one


def p2c(cands: Sequence[C], rng: random.Random) -> C:
    """Power of two choices over non-empty ``cands`` (all with weight > 0)."""
    n = len(cands)
    if n == 1:
        return cands[0]
    if all(c.weight == cands[0].weight for c in cands):
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        j += j >= i
    else:
        i = _draw(cands, rng)
        j = _draw(cands, rng, skip=i)
    a, b = cands[i], cands[j]
    return a if less_loaded(a, b) else b


def rendezvous_score(session: bytes, instance_id: str, weight: int) -> float:
    """Weighted highest-random-weight score; stable across processes (no PYTHONHASHSEED)."""
    h = hashlib.blake2b(session + b"\0" + instance_id.encode(), digest_size=8).digest()
    u = (int.from_bytes(h, "big") + 1) / (2**64 + 2)  # in (0, 1)
    return weight / -math.log(u)


def pinned(session: bytes, cands: Sequence[C]) -> C:
    return max(cands, key=lambda c: rendezvous_score(session, c.id, c.weight))


def much_busier(pin: Candidate, least: Candidate, slack: int, ratio: float) -> bool:
    """The pinned instance is busy enough that affinity should give way to load."""
    return pin.in_flight - least.in_flight > slack and pin.in_flight > ratio * least.in_flight


def choose(
    candidates: Sequence[C],
    now: float,
    rng: random.Random,
    exclude: Collection[str] = (),
    session: bytes | None = None,
    slack: int = 4,
    ratio: float = 2.0,
    keyed: Callable[[list[C]], C] | None = None,
) -> C | Verdict:
    """The instance for a new request, or ALL_FULL (queue it) or NO_INSTANCE (503)."""
    pool = eligible(candidates, now, exclude)
    if not pool:
        return NO_INSTANCE
    room = [c for c in pool if has_room(c)]
    if not room:
        return ALL_FULL
    if session is not None:
        pin = pinned(session, pool)
        if has_room(pin):
            least = min(room, key=lambda c: c.in_flight)
            if not much_busier(pin, least, slack, ratio):
                return pin
    if keyed is not None:
        return keyed(room)
    return p2c(room, rng)
