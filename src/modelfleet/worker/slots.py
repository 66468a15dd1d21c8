"""llama-server's own view of its slots: scraped from its ``/metrics`` and ``/slots``.

The worker asks every ready llama-server instance (Launch.slots > 0) once per heartbeat
and reports, per instance: slots, busy slots, queue (requests the server deferred because
every slot was busy), prompt tokens computed and reused from the prompt cache, generated
tokens. They go into the worker's Prometheus metrics and into the heartbeat's resources
(the console shows them). The gateway does not balance on them: its own in-flight counts
are exact and current, these are up to one heartbeat old.

Parsing is pure (``parse_metrics``, ``summarize``); ``SlotScraper`` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

import httpx

from modelfleet.metrics import (
    WORKER_RUNNER_GENERATED_TOKENS,
    WORKER_RUNNER_PROMPT_TOKENS,
    WORKER_RUNNER_PROMPT_TOKENS_CACHED,
    WORKER_RUNNER_QUEUE,
    WORKER_RUNNER_SLOTS,
    WORKER_RUNNER_SLOTS_BUSY,
)
from modelfleet.models import InstanceSlots

log = logging.getLogger("modelfleet.worker")

_GAUGES = (
    WORKER_RUNNER_SLOTS,
    WORKER_RUNNER_SLOTS_BUSY,
    WORKER_RUNNER_QUEUE,
    WORKER_RUNNER_PROMPT_TOKENS,
    WORKER_RUNNER_PROMPT_TOKENS_CACHED,
    WORKER_RUNNER_GENERATED_TOKENS,
)


@dataclass(frozen=True)
class Target:
    instance: str
    endpoint: str  # server root, no /v1
    slots: int  # what the runner was started with


def parse_metrics(text: str, prefix: str = "llamacpp:") -> dict[str, float]:
    """The ``prefix``-ed samples of a Prometheus text exposition, by name without the prefix.
    Labelled samples, comments and lines that do not parse are skipped (never raise: the
    text comes from another process)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(prefix) or "{" in line:
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            value = float(parts[1])
        except ValueError:
            continue
        if math.isfinite(value):
            out[parts[0][len(prefix) :]] = value
    return out


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) and value >= 0 else 0


def summarize(target: Target, slots_json: Any, metrics: dict[str, float]) -> InstanceSlots:
    """One instance's slot report from its /slots answer (a list of slot objects with
    ``is_processing``) and its parsed /metrics. Missing or odd fields count as 0."""
    slots = [s for s in slots_json if isinstance(s, dict)] if isinstance(slots_json, list) else []
    busy = sum(1 for s in slots if s.get("is_processing") is True)
    computed = _count(metrics.get("prompt_tokens_total"))
    cached = _count(metrics.get("prompt_tokens_cached_total"))
    return InstanceSlots(
        instance=target.instance,
        slots=len(slots) or target.slots,
        busy=busy if slots else _count(metrics.get("requests_processing")),
        queue=_count(metrics.get("requests_deferred")),
        prompt_tokens=computed,
        prompt_tokens_cached=cached,
        generated_tokens=_count(metrics.get("tokens_predicted_total")),
        cache_reuse=round(cached / (cached + computed), 4) if cached + computed else None,
    )


class SlotScraper:
    """Scrapes llama-server instances and keeps the latest report of each."""

    def __init__(self, timeout: float = 1.5) -> None:
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False)
        self.latest: dict[str, InstanceSlots] = {}

    async def scrape(self, targets: list[Target]) -> list[InstanceSlots]:
        reports = await asyncio.gather(*(self._one(t) for t in targets))
        gone = set(self.latest) - {t.instance for t in targets}
        for iid in gone:
            for gauge in _GAUGES:
                try:
                    gauge.remove(iid)
                except KeyError:
                    pass
        self.latest = {r.instance: r for r in reports}
        return list(reports)

    async def _one(self, t: Target) -> InstanceSlots:
        try:
            rs, rm = await asyncio.gather(
                self._client.get(f"{t.endpoint}/slots"), self._client.get(f"{t.endpoint}/metrics")
            )
            rs.raise_for_status()
            rm.raise_for_status()
            report = summarize(t, rs.json(), parse_metrics(rm.text))
        except (httpx.HTTPError, ValueError) as exc:
            # Busy or restarting server: keep the last numbers, say why they are stale.
            error = f"slots scrape failed: {type(exc).__name__}: {exc}"[:500]
            last = self.latest.get(t.instance)
            if last is None or last.error is None:
                log.info("instance %s: %s", t.instance, error)
            base = last or InstanceSlots(instance=t.instance, slots=t.slots)
            return base.model_copy(update={"error": error})
        last = self.latest.get(t.instance)
        if last is not None and last.error is not None:
            log.info("instance %s: slots scrape works again", t.instance)
        WORKER_RUNNER_SLOTS.labels(t.instance).set(report.slots)
        WORKER_RUNNER_SLOTS_BUSY.labels(t.instance).set(report.busy)
        WORKER_RUNNER_QUEUE.labels(t.instance).set(report.queue)
        WORKER_RUNNER_PROMPT_TOKENS.labels(t.instance).set(report.prompt_tokens)
        WORKER_RUNNER_PROMPT_TOKENS_CACHED.labels(t.instance).set(report.prompt_tokens_cached)
        WORKER_RUNNER_GENERATED_TOKENS.labels(t.instance).set(report.generated_tokens)
        return report

    async def aclose(self) -> None:
        await self._client.aclose()
