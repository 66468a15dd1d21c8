"""Liveness arithmetic: pure functions, no I/O."""

from __future__ import annotations

from modelfleet.models import WorkerRecord

DEFAULT_HEARTBEAT_INTERVAL = 2.0
DEFAULT_MISSED_HEARTBEATS = 3


def worker_ttl(interval: float = DEFAULT_HEARTBEAT_INTERVAL, missed: int = DEFAULT_MISSED_HEARTBEATS) -> float:
    """A worker is dead after ``missed`` heartbeat intervals without a heartbeat."""
    return interval * missed


def is_alive(heartbeat_age: float, ttl: float) -> bool:
    """Health is computed when read: alive while the last heartbeat is younger than the TTL."""
    return heartbeat_age < ttl


def alive_worker_ids(workers: list[WorkerRecord], ttl: float) -> set[str]:
    return {w.id for w in workers if is_alive(w.heartbeat_age, ttl)}
