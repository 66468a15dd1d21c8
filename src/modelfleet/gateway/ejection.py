"""Outlier ejection arithmetic: pure functions, no clock reads, no I/O.

An instance is ejected after ``eject_after`` consecutive failures (connect error, timeout
before headers, 429/502/503/504, a broken stream). The cooldown doubles with each repeat
(base, 2×base, 4×base … capped), as Envoy's outlier detection grows it, so a flapping
instance costs less and less; an instance that stays healthy for a while after its last
ejection starts again from the base cooldown. A plain 500 is passed to the client and
does not count: it is often caused by the request itself, and counting it would let one
poison request eject every instance of a model in turn.
"""

from __future__ import annotations

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES


def should_eject(consecutive_failures: int, eject_after: int) -> bool:
    return consecutive_failures >= eject_after


def cooldown_s(ejections: int, base: float, cap: float) -> float:
    """Cooldown of the ``ejections``-th ejection in a row (1 = first)."""
    return min(cap, base * 2 ** max(0, ejections - 1))


def ejections_after_quiet(ejections: int, last_ejected_at: float, now: float, base: float, cap: float) -> int:
    """Forget past ejections once twice the last cooldown (at least 2×base) has passed since
    the last ejection, i.e. the instance served for a whole cooldown after coming back:
    its next ejection is short again."""
    if ejections == 0:
        return 0
    quiet_needed = max(2 * base, 2 * cooldown_s(ejections, base, cap))
    return 0 if now - last_ejected_at > quiet_needed else ejections
