"""Admission arithmetic: pure functions for the per-model queue and 429s.

Every instance admits up to its max_concurrency requests. When every eligible instance of
a model is full, a request waits in that model's bounded FIFO queue for at most
``queue_wait_s``; when the queue is full, or the wait runs out, the answer is 429 with a
``Retry-After`` that estimates when the queue ahead of a retry would have drained.
"""

from __future__ import annotations

import math


def queue_has_room(queued: int, queue_len: int) -> bool:
    return queued < queue_len


def retry_after_s(queued: int, slots: int, mean_latency_s: float, low: int = 1, high: int = 60) -> int:
    """Seconds until ``queued`` + 1 requests drain through ``slots`` parallel slots, each
    taking ``mean_latency_s``, clamped to [low, high] (Retry-After is whole seconds)."""
    estimate = (queued + 1) * max(0.0, mean_latency_s) / max(1, slots)
    return int(min(high, max(low, math.ceil(estimate))))


def process_share(total: int, processes: int, index: int) -> int:
    """This process's part of an instance's max_concurrency when ``processes`` gateway
    processes share a port and keep separate counts. The parts add up to ``total``, except
    that every process keeps at least one slot, or an instance with fewer slots than
    processes would be unusable from some of them (then the total may exceed ``total`` by at
    most processes - total)."""
    return max(1, total // processes + (1 if index < total % processes else 0))


def ewma(old: float, sample: float, alpha: float = 0.1) -> float:
    """Exponentially weighted mean latency, for Retry-After estimates."""
    return sample if old <= 0 else old + alpha * (sample - old)


def hold_for_cold_start(routable_instances: int, excluded: int, wait_s: float) -> bool:
    """Hold a request that found no instance, rather than answer 503 at once?

    Only when the model has no routable instance at all (none ready: starting, being
    replaced, scaled to zero): the first one to become ready serves it. When routable
    instances exist but this request already tried them all (``excluded``), a 503 (with the
    last failure) is the honest answer: waiting would not bring a new one."""
    return wait_s > 0 and routable_instances == 0 and excluded == 0


def cold_retry_after_s(wait_s: float, low: int = 1, high: int = 60) -> int:
    """Retry-After of a 503 after a cold-start hold ran out: the model is still starting, so
    about the time a start takes, bounded like every Retry-After."""
    return int(min(high, max(low, math.ceil(wait_s / 4))))
