"""Recent request counts for the console: a ring of 10-second buckets per model."""

from __future__ import annotations

from typing import Any

BUCKET_S = 10
BUCKETS = 90  # 15 minutes


def outcome(status: int) -> int:
    """0 ok, 1 client error (4xx but 429), 2 error: the cluster failed to serve (5xx, 429)."""
    if status < 400:
        return 0
    if status >= 500 or status == 429:
        return 2
    return 1


class RecentStats:
    """Per model, per bucket: [requests, client_errors, errors]. Buckets are reused in place
    once their time has passed, so memory stays fixed."""

    def __init__(self, bucket_s: int = BUCKET_S, buckets: int = BUCKETS) -> None:
        self.bucket_s, self.n = bucket_s, buckets
        self._epochs: dict[str, list[int]] = {}  # which bucket-time each slot holds
        self._counts: dict[str, list[list[int]]] = {}

    def add(self, model: str, status: int, now: float) -> None:
        epoch = int(now // self.bucket_s)
        slot = epoch % self.n
        epochs = self._epochs.get(model)
        if epochs is None:
            epochs = self._epochs[model] = [-1] * self.n
            self._counts[model] = [[0, 0, 0] for _ in range(self.n)]
        c = self._counts[model][slot]
        if epochs[slot] != epoch:
            epochs[slot] = epoch
            c[0] = c[1] = c[2] = 0
        c[0] += 1
        k = outcome(status)
        if k:
            c[k] += 1

    def series(self, model: str, now: float, buckets: int | None = None) -> list[dict[str, Any]]:
        """Oldest first, one entry per bucket, empty buckets included."""
        n = min(buckets or self.n, self.n)
        last = int(now // self.bucket_s)
        epochs = self._epochs.get(model)
        out = []
        for epoch in range(last - n + 1, last + 1):
            slot = epoch % self.n
            c = self._counts[model][slot] if epochs is not None and epochs[slot] == epoch else [0, 0, 0]
            out.append({"start": epoch * self.bucket_s, "requests": c[0], "client_errors": c[1], "errors": c[2]})
        return out

    def models(self) -> list[str]:
        return sorted(self._epochs)
