"""Gateway settings: one dataclass, every field a CLI flag and a MODELFLEET_* variable."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from modelfleet.config import DEFAULT_GATEWAY_PORT, modelfleet_home, resolve_token, split_controllers

MiB = 1024 * 1024


@dataclass
class GatewaySettings:
    # Comma-separated string or list; any healthy one is long-polled, the next on failure.
    controllers: list[str] | str = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = DEFAULT_GATEWAY_PORT
    # Sent to controllers (routes, events, UI proxy default); the join token works too.
    admin_token: str | None = None
    # The same, read from a file (recommended: a flag is visible in the process list).
    admin_token_file: str | None = None
    # Where the last route table is persisted; default $MODELFLEET_HOME/gateway-routes.json.
    # An empty string turns persistence off.
    snapshot_path: Path | str | None = None
    max_body_bytes: int = 10 * MiB
    # Failover: attempts on distinct instances, and no new attempt after this many seconds.
    max_attempts: int = 3
    retry_budget_s: float = 30.0
    connect_timeout_s: float = 2.0
    # Most runners send headers of a non-streamed completion only when it is done, so this
    # must be longer than the longest generation; it is not a latency target.
    header_timeout_s: float = 300.0
    # A stream (or body) that stalls this long is broken.
    read_timeout_s: float = 300.0
    # Clients that make no progress (client_timeouts.py; nginx's names): the request's headers
    # must arrive within client_header_timeout_s of its first byte, its body must not pause
    # longer than client_body_timeout_s, and an answer the client stops reading for
    # send_timeout_s ends its request (connection closed, upstream closed, slot freed).
    client_header_timeout_s: float = 30.0
    client_body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    # Ejection: after this many consecutive failures, for a cooldown that doubles per repeat.
    eject_after: int = 3
    eject_cooldown_s: float = 10.0
    eject_cooldown_max_s: float = 300.0
    # Admission: per-model queue when every instance is at max_concurrency.
    queue_len: int = 100
    # Long enough that a burst one replica absorbs within a minute waits instead of failing
    # (a 12-request batch on one 8-slot llama-server replica of the bundled model).
    queue_wait_s: float = 60.0
    # Cold start: a request for a model that is listed but has no ready instance (starting,
    # being replaced, scaled to zero), or that arrives before this gateway's first route
    # table, is held this long for the first instance to become ready; then 503 + Retry-After.
    # The bundled models load in seconds on a quiet machine; a large model on a busy one
    # takes minutes: 120 s covers the first, the flag the second. 0: refuse at once (503).
    cold_start_wait_s: float = 120.0
    # Session affinity (X-Session-ID) yields when the pinned instance has this many more
    # requests in flight than the least busy one and at least `affinity_ratio` times as many.
    affinity_slack: int = 4
    affinity_ratio: float = 2.0
    # Prefix-aware routing (models with routing "prefix", docs/gateway.md): the instance that
    # holds a prompt's prefix takes it while its in-flight count is at most this factor (at
    # least 1) of the least loaded one's, plus `prefix_load_slack` requests (0 suits runners
    # that serve one request at a time; a few, batching ones); the index of what was sent
    # where keeps this many blocks (~64 tokens each) per model, each believed for this long.
    prefix_load_bound: float = 1.25
    prefix_load_slack: int = 0
    prefix_index_blocks: int = 32768
    prefix_ttl_s: float = 600.0
    # Long-poll wait per routes request; failures of a controller are seen within it.
    poll_wait_s: float = 10.0
    # Worker processes sharing the port (SO_REUSEPORT). See docs/gateway.md for what splits.
    processes: int = 1
    # Names this gateway in events sent to controllers; default host:port.
    gateway_id: str = ""
    # On SIGTERM/SIGINT: /health/ready answers 503 at once while the port keeps serving this
    # many seconds (a load balancer polling readiness moves away first); then the port
    # closes and requests in flight finish. 0: close the port at once.
    shutdown_delay_s: float = 0.0
    log_level: str = "info"
    # text or json (logs.py); empty: MODELFLEET_LOG_FORMAT, else text.
    log_format: str = ""
    # One log line per inference request (request id, model, instance, status, timings):
    # logs.py / docs/operations.md. Off by default (`up`), on in the deploy manifests.
    access_log: bool = False

    def __post_init__(self) -> None:
        self.controllers = split_controllers(self.controllers)
        self.admin_token = resolve_token(self.admin_token, self.admin_token_file, "admin")
        self.admin_token_file = None  # read once: a copy (another process) must not read it again
        if self.snapshot_path is None:
            self.snapshot_path = modelfleet_home() / "gateway-routes.json"
        elif self.snapshot_path != "":
            self.snapshot_path = Path(self.snapshot_path).expanduser()
        if not self.gateway_id:
            self.gateway_id = f"{socket.gethostname()}:{self.port}"
        if self.max_attempts < 1 or self.processes < 1 or self.eject_after < 1:
            raise ValueError("max_attempts, processes and eject_after must be at least 1")
        if self.log_format and self.log_format.lower() not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.prefix_load_bound < 1 or self.prefix_load_slack < 0 or self.prefix_index_blocks < 1 \
                or self.prefix_ttl_s <= 0:
            raise ValueError("prefix_load_bound must be at least 1, prefix_load_slack at least 0, "
                             "prefix_index_blocks and prefix_ttl_s positive")
        if min(self.client_header_timeout_s, self.client_body_timeout_s, self.send_timeout_s) <= 0:
            raise ValueError("client_header_timeout_s, client_body_timeout_s and send_timeout_s must be positive")

    @property
    def controller_list(self) -> list[str]:
        assert isinstance(self.controllers, list)
        return self.controllers

    @property
    def snapshot(self) -> Path | None:
        return self.snapshot_path if isinstance(self.snapshot_path, Path) else None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        """Read MODELFLEET_<FIELD> variables (MODELFLEET_CONTROLLER for the list), then overrides."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = "MODELFLEET_CONTROLLER" if f.name == "controllers" else f"MODELFLEET_{f.name.upper()}"
            if name in env:
                values[f.name] = _convert(f.type, env[name])
        values.update(overrides)
        return cls(**values)


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _convert(annotation: Any, raw: str) -> Any:
    t = str(annotation)
    if t.startswith("bool"):
        if raw.strip().lower() in TRUE:
            return True
        if raw.strip().lower() in FALSE:
            return False
        raise ValueError(f"not a boolean: {raw!r} (true or false)")
    if t.startswith("int"):
        return int(raw)
    if t.startswith("float"):
        return float(raw)
    return raw
