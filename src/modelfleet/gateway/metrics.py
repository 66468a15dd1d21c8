"""Prometheus metrics of one gateway process, in a registry of its own (a test process may
hold several gateways; `modelfleet up` may hold every role).

Counters and histograms are updated on the request path through cached label children.
Gauges (in flight, queued, ejected, route-table age) are not: a collector reads the live
state when /metrics is scraped, which costs the request path nothing.

With several gateway processes on one port (``processes`` > 1) a scrape lands on any one of
them, so the supervisor sets PROMETHEUS_MULTIPROC_DIR: counters and histograms then live in
files every process writes, the live gauges are copied there once a second, and /metrics
sums (in flight, queued) or takes the max (ejected, table age) over live processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from modelfleet.gateway.pool import Pool
    from modelfleet.gateway.routes import RouteWatcher

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class LiveGauge(NamedTuple):
    """A gauge read from live state at scrape time. Its label names are fixed here, where it
    is declared: the multi-process publisher builds its shared gauge from them, never from
    the first sample it happens to see (at start-up there is none)."""

    doc: str
    labels: tuple[str, ...]
    mode: str  # how it adds up over processes (prometheus_client multiprocess_mode)


LIVE_GAUGES = {
    "modelfleet_gateway_in_flight": LiveGauge("Requests in flight per model", ("model",), "livesum"),
    "modelfleet_gateway_queued": LiveGauge("Requests queued per model", ("model",), "livesum"),
    "modelfleet_gateway_instance_in_flight": LiveGauge("Requests in flight per instance", ("model", "instance"),
                                                       "livesum"),
    "modelfleet_gateway_instance_ejected": LiveGauge("1 while the instance is ejected", ("model", "instance"),
                                                     "livemax"),
    "modelfleet_gateway_prefix_index_blocks": LiveGauge(
        "Prompt blocks in the prefix-routing index per model (routing prefix)", ("model",), "livesum"),
    "modelfleet_gateway_route_table_age_seconds": LiveGauge(
        "Seconds since a controller last vouched for the route table", (), "livemax"),
    "modelfleet_gateway_route_table_fresh": LiveGauge("1 while a controller answers", (), "livemin"),
    "modelfleet_gateway_route_table_revision": LiveGauge("Routing revision in use", (), "livemax"),
}


def live_family(name: str, value: float | None = None) -> GaugeMetricFamily:
    g = LIVE_GAUGES[name]
    if g.labels:
        return GaugeMetricFamily(name, g.doc, labels=list(g.labels))
    return GaugeMetricFamily(name, g.doc, value=value)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("modelfleet_gateway_requests", "Inference requests answered",
                                ["model", "status"], registry=r)
        self.latency = Histogram("modelfleet_gateway_request_seconds", "Request latency, end to end",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("modelfleet_gateway_time_to_first_token_seconds",
                              "Time to the first streamed chunk", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("modelfleet_gateway_tokens", "Tokens from upstream usage", ["model", "direction"],
                              registry=r)
        self.retries = Counter("modelfleet_gateway_retries", "Requests retried on another instance",
                               ["model", "reason"], registry=r)
        self.ejections = Counter("modelfleet_gateway_ejections", "Instances ejected", ["model", "instance"],
                                 registry=r)
        self.stream_errors = Counter("modelfleet_gateway_stream_errors", "Streams broken after their first byte",
                                     ["model"], registry=r)
        self.client_timeouts = Counter("modelfleet_gateway_client_timeouts",
                                       "Client connections closed for making no progress (client_timeouts.py)",
                                       ["phase"], registry=r)
        self.route_events = Counter(
            "modelfleet_gateway_route_events",
            "Route tables refused (refused_cluster, refused_revision), held (held_sudden_loss, held_reconnect), "
            "or served with keys kept required (auth_kept_required)", ["event"], registry=r)
        self.prefix_routed = Counter(
            "modelfleet_gateway_prefix_routed",
            "Prefix-routed requests by outcome: cached (to the instance believed to hold the most of the "
            "prompt), home (no history: the prefix's rendezvous home), spilled (the preferred one was over "
            "the load bound)", ["model", "outcome"], registry=r)
        self._req: dict[tuple[str, int], Callable[[], None]] = {}
        self._lat: dict[str, Callable[[float], None]] = {}
        self._ttft: dict[str, Callable[[float], None]] = {}
        self._tok: dict[str, tuple[Callable[[float], None], Callable[[float], None]]] = {}
        self._gauges: dict[str, Gauge] = {}
        self._published: dict[str, set[tuple[str, ...]]] = {}

    def attach(self, pool: Pool, watcher: RouteWatcher) -> None:
        self.live = _LiveCollector(pool, watcher)
        if not self.multiprocess:
            self.registry.register(self.live)  # else publish() copies it to the shared files

    @property
    def multiprocess(self) -> bool:
        return bool(os.environ.get(MULTIPROC_ENV))

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)

    def publish(self) -> None:
        """Multi-process mode: copy the live gauges into the shared files. Label sets that
        vanished (a removed instance) are set to 0 rather than left at their last value."""
        seen: dict[str, set[tuple[str, ...]]] = {}
        for family in self.live.collect():
            g = self._gauges.get(family.name)
            if g is None:
                spec = LIVE_GAUGES[family.name]
                g = self._gauges[family.name] = Gauge(family.name, spec.doc, list(spec.labels), registry=None,
                                                      multiprocess_mode=spec.mode)
            keys = seen.setdefault(family.name, set())
            for sample in family.samples:
                key = tuple(sample.labels.values())
                keys.add(key)
                (g.labels(*key) if key else g).set(sample.value)
        for name, keys in self._published.items():
            for key in keys - seen.get(name, set()):
                if key:
                    self._gauges[name].labels(*key).set(0)
        self._published = seen

    # Cached children: .labels() takes a lock and builds a tuple key on every call.
    def count(self, model: str, status: int) -> None:
        f = self._req.get((model, status))
        if f is None:
            f = self._req[(model, status)] = self.requests.labels(model, str(status)).inc
        f()

    def observe_latency(self, model: str, seconds: float) -> None:
        f = self._lat.get(model)
        if f is None:
            f = self._lat[model] = self.latency.labels(model).observe
        f(seconds)

    def observe_ttft(self, model: str, seconds: float) -> None:
        f = self._ttft.get(model)
        if f is None:
            f = self._ttft[model] = self.ttft.labels(model).observe
        f(seconds)

    def count_tokens(self, model: str, prompt: int | None, completion: int | None) -> None:
        f = self._tok.get(model)
        if f is None:
            f = self._tok[model] = (self.tokens.labels(model, "in").inc, self.tokens.labels(model, "out").inc)
        if prompt:
            f[0](prompt)
        if completion:
            f[1](completion)


class _LiveCollector(Collector):
    def __init__(self, pool: Pool, watcher: RouteWatcher) -> None:
        self.pool, self.watcher = pool, watcher

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        m_in, m_q = live_family("modelfleet_gateway_in_flight"), live_family("modelfleet_gateway_queued")
        i_in = live_family("modelfleet_gateway_instance_in_flight")
        i_ej = live_family("modelfleet_gateway_instance_ejected")
        p_ix = live_family("modelfleet_gateway_prefix_index_blocks")
        for name, m in self.pool.models.items():
            if m.prefixes is not None:
                p_ix.add_metric([name], len(m.prefixes))
            m_in.add_metric([name], m.in_flight)
            m_q.add_metric([name], len(m.waiters))
            for i in m.instances:
                i_in.add_metric([name, i.id], i.in_flight)
                i_ej.add_metric([name, i.id], 1.0 if i.ejected(now) else 0.0)
        yield from (m_in, m_q, i_in, i_ej, p_ix)
        f = self.watcher.freshness
        age = f.age_s(time.time(), self.watcher.polling)
        yield live_family("modelfleet_gateway_route_table_age_seconds", -1.0 if age is None else age)
        yield live_family("modelfleet_gateway_route_table_fresh", 1.0 if f.fresh else 0.0)
        yield live_family("modelfleet_gateway_route_table_revision", float(self.watcher.revision))
