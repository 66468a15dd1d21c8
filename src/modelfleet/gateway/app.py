"""Entry points: ``create_app(settings)`` (ASGI) and ``run_gateway(settings)`` (blocking).

Serving: uvicorn (uvloop, httptools) on a socket bound with SO_REUSEPORT, in one process
or several. With ``processes`` > 1 each process binds its own socket to the same port and
the kernel spreads connections over them; each is a complete gateway (own route watcher,
counts, queues, ejections): see docs/gateway.md for what that splits."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from types import FrameType

import uvicorn
from prometheus_client.multiprocess import mark_process_dead

from modelfleet.gateway.api import GatewayApp, create_app
from modelfleet.gateway.client_timeouts import ClientTimeouts, guarded_protocol
from modelfleet.gateway.metrics import MULTIPROC_ENV

__all__ = ["create_app", "run_gateway", "serve"]
from modelfleet.gateway.settings import GatewaySettings
from modelfleet.logs import is_configured, setup_logging

log = logging.getLogger("modelfleet.gateway")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def serve(settings: GatewaySettings, process_index: int = 0) -> None:
    """Run one gateway process until SIGINT/SIGTERM."""
    _setup_logging(settings)
    sock = bind_socket(settings.host, settings.port)
    app = create_app(settings, process_index)
    timeouts = ClientTimeouts(settings.client_header_timeout_s, settings.client_body_timeout_s,
                              settings.send_timeout_s)

    def timed_out(phase: str) -> None:
        app.metrics.client_timeouts.labels(phase).inc()
        log.debug("client connection closed: no progress (%s) within its timeout", phase)

    config = uvicorn.Config(
        app,
        # httptools, plus bounds on clients that stop sending or reading (client_timeouts.py).
        loop="uvloop", http=guarded_protocol(timeouts, timed_out), lifespan="on", access_log=False,
        server_header=False,
        timeout_keep_alive=75, backlog=4096,
        # uvicorn's own lines go through logs.py (text or JSON) like ours, at WARNING unless
        # --log-level debug (logs.setup_logging sets its loggers' levels; None: uvicorn keeps them).
        log_config=None, log_level=None,
        # X-Forwarded-For rewriting is a middleware on every request; the gateway does not use it.
        proxy_headers=False,
        # uvicorn's own limit would answer 503 before our admission does; ours is per model.
        limit_concurrency=None,
    )
    DrainingServer(config, settings.shutdown_delay_s).run(sockets=[sock])


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain delay: the first SIGTERM/SIGINT turns readiness off
    (``GatewayApp.draining``) and keeps the port open ``delay_s``; then uvicorn's own graceful
    shutdown runs (stop accepting, let requests in flight finish). A second signal during
    the delay stops at once."""

    def __init__(self, config: uvicorn.Config, delay_s: float) -> None:
        super().__init__(config)
        self.delay_s = delay_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        if self.delay_s <= 0 or self._loop is None or not isinstance(app, GatewayApp) or app.draining:
            return super().handle_exit(sig, frame)
        app.draining = True
        # A signal handler runs between two bytecodes of whatever the loop was doing: hand
        # the rest to the loop.
        self._loop.call_soon_threadsafe(self._drain, sig)

    def _drain(self, sig: int) -> None:
        log.info("gateway: %s: not ready; serving %.1f s more, then closing the port and finishing "
                 "requests in flight", signal.Signals(sig).name, self.delay_s)
        assert self._loop is not None
        self._loop.call_later(self.delay_s, super().handle_exit, sig, None)


def run_gateway(settings: GatewaySettings) -> None:
    """Blocking. One process, or a supervisor of ``settings.processes`` that restarts any
    that dies and stops them all on SIGINT/SIGTERM."""
    if settings.processes <= 1:
        serve(settings, 0)
        return
    _setup_logging(settings)
    # Metrics shared by the processes (a scrape lands on any one): prometheus_client's
    # multiprocess mode, which every child reads from its environment at import.
    metrics_dir = tempfile.mkdtemp(prefix="modelfleet-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}

    def start(i: int) -> None:
        p = ctx.Process(target=serve, args=(settings, i), name=f"gateway-{i}", daemon=False)
        p.start()
        procs[i] = p

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(settings.processes):
        start(i)
    log.info("gateway supervisor: %d processes on port %d (SO_REUSEPORT)", settings.processes, settings.port)
    while not stopping:
        time.sleep(0.5)
        for i, p in list(procs.items()):
            if not p.is_alive() and not stopping:
                log.warning("gateway process %d (pid %s) exited with %s; restarting it", i, p.pid, p.exitcode)
                if p.pid:
                    mark_process_dead(p.pid, metrics_dir)  # its live gauges no longer count
                start(i)
    for p in procs.values():
        p.join(timeout=15 + settings.shutdown_delay_s)
        if p.is_alive() and p.pid:
            os.kill(p.pid, signal.SIGKILL)
    shutil.rmtree(metrics_dir, ignore_errors=True)


def _setup_logging(settings: GatewaySettings) -> None:
    """Once per process: the CLI may have done it; a spawned gateway process or
    ``python -m modelfleet.gateway`` does it here (format: the setting, else
    MODELFLEET_LOG_FORMAT, else text)."""
    if not is_configured():
        setup_logging("gateway", settings.log_level, settings.log_format or None)
    logging.getLogger("modelfleet").setLevel(settings.log_level.upper())
