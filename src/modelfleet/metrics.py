"""Prometheus metrics of the controller and worker (the gateway keeps its own in gateway/).

Each role runs in its own process, so the default registry holds only that role's series."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response

CONTROLLER_HEARTBEATS = Counter(
    "modelfleet_controller_heartbeats_total", "Worker heartbeats handled", ["result"]
)
CONTROLLER_HEARTBEAT_SECONDS = Histogram(
    "modelfleet_controller_heartbeat_seconds", "Time to handle one heartbeat",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CONTROLLER_WORKERS = Gauge("modelfleet_controller_workers", "Workers known to the store", ["health"])
CONTROLLER_IS_LEADER = Gauge("modelfleet_controller_is_leader", "1 while this controller holds the lease")
CONTROLLER_LEASE_TOKEN = Gauge("modelfleet_controller_lease_fencing_token", "Fencing token of the held lease")
CONTROLLER_STORE_UP = Gauge("modelfleet_controller_store_up", "1 while the store answers and is migrated")
CONTROLLER_STORE_LOST = Gauge(
    "modelfleet_controller_store_state_lost",
    "1 while the store does not show the cluster identity this controller serves (it lost its state)",
)
CONTROLLER_OUTAGE_FORGIVEN = Counter(
    "modelfleet_controller_outage_seconds_forgiven_total",
    "Seconds without any heartbeat in the store, left out of worker ages (record_outage)",
)
CONTROLLER_REVISION = Gauge("modelfleet_controller_routing_revision", "Last routing revision seen")
CONTROLLER_ROUTE_WAITERS = Gauge("modelfleet_controller_route_waiters", "Gateways long-polling routes now")
CONTROLLER_GC_DELETED = Counter("modelfleet_controller_gc_workers_deleted_total", "Long-dead workers deleted")
CONTROLLER_INSTANCE_EVENTS = Counter(
    "modelfleet_controller_instance_events_total", "Events gateways reported about instances", ["event"]
)

WORKER_HEARTBEATS = Counter("modelfleet_worker_heartbeats_total", "Heartbeats sent", ["result"])
WORKER_CONTROLLER_SWITCHES = Counter(
    "modelfleet_worker_controller_switches_total", "Times the worker moved to another controller"
)
WORKER_INSTANCES = Gauge("modelfleet_worker_instances", "Instances on this worker", ["state"])
WORKER_REGISTERED = Gauge("modelfleet_worker_registered", "1 while the last heartbeat was accepted")


def metrics_response() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

# Model downloads and the model cache (worker/downloads.py). Per-source series exist only
# while that source downloads.
WORKER_DOWNLOAD_DONE = Gauge("modelfleet_worker_download_done_bytes", "Bytes on disk of each active download",
                             ["source"])
WORKER_DOWNLOAD_SIZE = Gauge("modelfleet_worker_download_size_bytes", "Size of each active download (0: unknown)",
                             ["source"])
WORKER_DOWNLOAD_RATE = Gauge("modelfleet_worker_download_rate_bytes_per_second",
                             "Recent rate of each active download", ["source"])
WORKER_DOWNLOADED_BYTES = Counter("modelfleet_worker_downloaded_bytes_total", "Bytes received by model downloads")
WORKER_DOWNLOADS = Counter("modelfleet_worker_downloads_total", "Model downloads ended, by outcome",
                           ["result"])  # ok, cached, failed, cancelled
WORKER_MODEL_CACHE_BYTES = Gauge("modelfleet_worker_model_cache_bytes", "Bytes of complete sources in the model cache")
WORKER_MODEL_CACHE_SOURCES = Gauge("modelfleet_worker_model_cache_sources", "Complete sources in the model cache")

# llama-server instances' own view of their slots (worker/slots.py), one series per instance
# while it runs. The token counts are cumulative since the runner's start (the server's
# counters, mirrored: they restart from 0 with the runner).
WORKER_RUNNER_SLOTS = Gauge("modelfleet_worker_runner_slots", "Parallel slots of a llama-server instance",
                            ["instance"])
WORKER_RUNNER_SLOTS_BUSY = Gauge("modelfleet_worker_runner_slots_busy", "Slots decoding a request now",
                                 ["instance"])
WORKER_RUNNER_QUEUE = Gauge("modelfleet_worker_runner_queue",
                            "Requests waiting inside the server for a free slot (llamacpp:requests_deferred)",
                            ["instance"])
WORKER_RUNNER_PROMPT_TOKENS = Gauge("modelfleet_worker_runner_prompt_tokens",
                                    "Prompt tokens computed since the runner started (cache misses)", ["instance"])
WORKER_RUNNER_PROMPT_TOKENS_CACHED = Gauge("modelfleet_worker_runner_prompt_tokens_cached",
                                           "Prompt tokens reused from the prompt cache since the runner started",
                                           ["instance"])
WORKER_RUNNER_GENERATED_TOKENS = Gauge("modelfleet_worker_runner_generated_tokens",
                                       "Tokens generated since the runner started", ["instance"])
