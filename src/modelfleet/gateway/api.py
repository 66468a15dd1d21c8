"""The gateway's ASGI application: the inference paths go straight to the raw handler in
proxy.py; everything else (health, metrics, models, status, console, cluster proxy) is a
small Starlette app, where a few microseconds do not matter."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import modelfleet
from modelfleet import __version__
from modelfleet.errors import error_body
from modelfleet.gateway.access import RequestEdge
from modelfleet.gateway.auth import bearer_token, key_allowed
from modelfleet.gateway.load_report import LoadReporter
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.openapi import document as openapi_document
from modelfleet.gateway.pool import Pool
from modelfleet.gateway.proxy import Proxy, Receive, Scope, Send
from modelfleet.gateway.routes import EMPTY, Grace, RouteTable, RouteWatcher, is_ready, keep_missing, sudden_loss
from modelfleet.gateway.settings import GatewaySettings
from modelfleet.gateway.stats import RecentStats
from modelfleet.gateway.validate import ENDPOINTS

log = logging.getLogger("modelfleet.gateway")

UI_DIR = Path(modelfleet.__file__).parent / "ui" / "static"
INFERENCE_PATHS = {p: p for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")}
CLUSTER_METHODS = ["GET", "POST", "PATCH", "DELETE"]
# Request headers the cluster proxy passes to a controller; the browser's own Authorization
# goes through as is, and the gateway never adds its admin token to a browser's call.
CLUSTER_FORWARD = ("authorization", "content-type", "accept")


CLUSTER_PREFIX = "/v1/cluster/"
# What a path segment may keep unencoded when forwarded (RFC 3986 pchar): ids keep their ':'.
SEGMENT_SAFE = ":@!$&'()*+,;="


def cluster_path(raw_path: bytes) -> str | None:
    """The path to forward for a ``/v1/cluster/…`` request, or None to refuse it (400).

    Decoded once, then every segment must be a plain name: no empty, ``.`` or ``..``
    segment, no backslash, no control character. A ``%2F`` inside a segment (the console
    encodes ids, and instance ids contain ``/``) decodes to a separator like any other, so
    ``instances/w1%2Fa/logs`` forwards as ``instances/w1/a/logs``, which the controller's
    ``{instance_id:path}`` routes read as ``w1/a``. Each segment is re-encoded on the way out,
    so what reaches the controller is exactly what was checked: nothing can normalize to a
    path outside ``/v1/cluster/`` (``..%2f..%2fmetrics`` would have reached ``/metrics``:
    the HTTP client resolves dot segments)."""
    try:
        raw = raw_path.decode("ascii")
        if not raw.startswith(CLUSTER_PREFIX):
            return None
        rest = unquote(raw[len(CLUSTER_PREFIX):], errors="strict")
    except UnicodeDecodeError:
        return None
    segments = rest.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or "\\" in seg or any(c < " " or c == "\x7f" for c in seg):
            return None
    return CLUSTER_PREFIX + "/".join(quote(seg, safe=SEGMENT_SAFE) for seg in segments)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def error_json(status: int, message: str, code: str | None = None, param: str | None = None) -> Response:
    return json_response(error_body(status, message, code=code, param=param), status)


class GatewayApp:
    """One gateway process. ``process_index`` is this process's rank among ``processes``."""

    def __init__(self, settings: GatewaySettings, process_index: int = 0) -> None:
        self.s = settings
        self.process_index = process_index
        self.started_at = time.time()
        self.table: RouteTable = EMPTY
        self.metrics = GatewayMetrics()
        self.stats = RecentStats()
        self.pool = Pool(settings, report=self._instance_event, process_index=process_index)
        self.watcher = RouteWatcher(settings.controller_list, settings.admin_token, self._apply,
                                    settings.snapshot, settings.poll_wait_s,
                                    count_event=lambda event: self.metrics.route_events.labels(event).inc())
        self.proxy = Proxy(settings, self.pool, self.metrics, self.stats, lambda: self.table)
        self.metrics.attach(self.pool, self.watcher)
        self.pool.on_prefix = lambda model, outcome: self.metrics.prefix_routed.labels(model, outcome).inc()
        # Per-model load to a controller every second (autoscaling, drains: load_report.py).
        self.reporter = LoadReporter(self.pool, self.watcher, f"{settings.gateway_id}#{process_index}",
                                     lambda: self.table.revision)
        self.pool.on_hold = self.reporter.nudge
        self._first_table = asyncio.Event()
        self._latest: RouteTable = EMPTY  # as the controller sent it (self.table may keep more)
        self._grace: Grace | None = None  # a hold on missing instances: see routes.keep_missing
        self._publisher: asyncio.Task[None] | None = None
        self._started = False
        self.draining = False  # shutting down: not ready, still serving (app.DrainingServer)
        self.other = self._build_app()
        # Request ids in and out of every HTTP request, and the access log (access.py).
        self.edge = RequestEdge(self._http, access=settings.access_log, logged_paths=frozenset(INFERENCE_PATHS))

    # -- ASGI -----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            return await self.edge(scope, receive, send)
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        return await self.other(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = INFERENCE_PATHS.get(scope["path"])
        if path is not None and scope["method"] == "POST":
            return await self.proxy.handle(scope, receive, send, path)
        return await self.other(scope, receive, _stamped(send))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self, first_table_wait_s: float = 3.0) -> None:
        self.watcher.load_snapshot()
        await self.watcher.start()
        self.reporter.start()
        if self.metrics.multiprocess:
            self._publisher = asyncio.create_task(self._publish_metrics(), name="metrics-publisher")
        if not self.watcher.freshness.loaded and self.s.controller_list:
            # Answering "no such model" for every model until the first table arrives would be
            # wrong; a short wait at start usually avoids it.
            try:
                await asyncio.wait_for(self._first_table.wait(), first_table_wait_s)
            except TimeoutError:
                log.warning("no route table yet (no controller answered, no snapshot): not ready")
        s = self.s
        proc = f", process {self.process_index + 1}/{s.processes}" if s.processes > 1 else ""
        log.info("modelfleet gateway %s on %s:%d%s; controllers %s; route snapshot %s; inference %s",
                 __version__, s.host, s.port, proc, ",".join(s.controller_list) or "none",
                 s.snapshot or "off", self._auth_state())
        self._started = True

    async def _publish_metrics(self) -> None:
        while True:
            try:
                self.metrics.publish()
            except Exception:  # a metrics hiccup must never stop serving
                log.exception("publishing metrics failed")
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        await self.reporter.stop()
        await self.watcher.stop()
        self.proxy.stop()

    def _auth_state(self) -> str:
        if not self.watcher.freshness.loaded:
            return "state unknown until a route table arrives"
        if self.table.auth_required:
            return f"requires an API key ({len(self.table.key_hashes)} active)"
        return "OPEN: no API key is defined, anyone who reaches this port can call models"

    def _apply(self, table: RouteTable, reconnected: bool = False) -> None:
        was_open = not self.table.auth_required
        first = self.table is EMPTY
        announce = first and self._started  # the start-up line could not say open or keyed
        now = time.monotonic()
        previous, self._latest = self._latest, table
        ended = self._grace is not None and not self._grace.active(now, table.revision)
        if ended:
            assert self._grace is not None
            log.info("route hold over at revision %d (%s)", table.revision, self._grace.reason)
            self._grace = None  # this table is believed as it is, missing instances and all
        hold = None
        if not first and reconnected:
            hold = "reconnected to the controllers"
        elif not first:
            # Against what the controllers said last, not what we serve: a loss that starts
            # while a hold is on holds again, and a hold that ended is not taken for a new loss.
            hold = sudden_loss(previous, table)
            if hold:
                log.warning("route table revision %d not believed at once: %s; keeping them until the revision "
                            "moves again after %.1f s with them still gone", table.revision, hold,
                            table.heartbeat_ttl)
        if hold:
            self._grace = Grace(now, table.revision, table.heartbeat_ttl, hold)
            self.metrics.route_events.labels("held_reconnect" if reconnected else "held_sudden_loss").inc()
            asyncio.get_running_loop().call_later(table.heartbeat_ttl + 0.05, self._grace_over)
        in_grace = self._grace is not None
        if in_grace:
            table = keep_missing(self.table, table)
        self.table = table
        self.pool.apply(table)
        log.debug("route table revision %d applied%s: %d models, %d instances", table.revision,
                  " (hold on missing instances)" if in_grace else "", len(table.models),
                  sum(len(v) for v in table.models.values()))
        if announce or (not first and was_open != (not table.auth_required)):
            log.warning("inference %s", self._auth_state())
        self._first_table.set()

    def _grace_over(self) -> None:
        """The TTL part of the grace is over; if the revision moved meanwhile, end it now, else
        the next revision will (or the 10-TTL cap, checked here again)."""
        g = self._grace
        if g is None:
            return
        if not g.active(time.monotonic(), self._latest.revision):
            self._apply(self._latest)
        else:
            asyncio.get_running_loop().call_later(g.ttl, self._grace_over)

    def _instance_event(self, instance_id: str, event: str, reason: str) -> None:
        inst = self.pool.instances.get(instance_id)
        if event == "ejected":
            self.metrics.ejections.labels(inst.model.name if inst else "-", instance_id).inc()
        self.watcher.report(instance_id, event, reason, self.s.gateway_id)

    # -- the other endpoints ------------------------------------------------------------------
    def _build_app(self) -> Starlette:
        routes: list[Any] = [
            Route("/health/live", self.live),
            Route("/health/ready", self.ready),
            Route("/metrics", self.metrics_endpoint),
            Route("/v1/models", self.models),
            Route("/v1/models/{model:path}", self.model),
            Route("/v1/gateway/status", self.status),
            Route("/openapi.json", self.openapi),
            Route("/v1/cluster/{path:path}", self.cluster, methods=CLUSTER_METHODS),
            Route("/", self.index),
        ]
        for p in INFERENCE_PATHS:
            routes.append(Route(p, self.method_not_allowed, methods=["GET", "PUT", "PATCH", "DELETE"]))
        if UI_DIR.is_dir():
            routes.append(Mount("/ui", app=StaticFiles(directory=UI_DIR, check_dir=False), name="ui"))
        app = Starlette(routes=routes)

        async def not_found(_: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            return error_json(status, str(getattr(exc, "detail", "not found")))

        app.add_exception_handler(404, not_found)
        app.add_exception_handler(405, not_found)
        return app

    async def live(self, _: Request) -> Response:
        return json_response({"live": True, "pid": os.getpid()})

    def _table_view(self) -> dict[str, Any]:
        f = self.watcher.freshness
        age = f.age_s(time.time(), self.watcher.polling)
        return {
            "revision": self.table.revision if f.loaded else None,
            "state": "none" if not f.loaded else ("fresh" if f.fresh else "stale"),
            "source": f.source,
            "age_s": None if age is None else round(age, 3),
            "controller": f.controller,
            "controllers": self.s.controller_list,
        }

    async def ready(self, _: Request) -> Response:
        n = len(self.pool.instances)
        ok = is_ready(self.watcher.freshness, n) and not self.draining
        return json_response({"ready": ok, "draining": self.draining, "route_table": self._table_view(),
                              "instances": n, "models": len(self.pool.models)}, 200 if ok else 503)

    async def metrics_endpoint(self, _: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _key_ok(self, request: Request) -> bool:
        return key_allowed(request.headers.get("authorization", "").encode(), self.table.key_hashes,
                           self.table.auth_required)

    async def models(self, request: Request) -> Response:
        if not self._key_ok(request):
            return error_json(401, "invalid or missing API key", code="invalid_api_key")
        data = [self._model_entry(name) for name in sorted(self.pool.models)]
        return json_response({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        if not self._key_ok(request):
            return error_json(401, "invalid or missing API key", code="invalid_api_key")
        name = request.path_params["model"]
        if name not in self.pool.models:
            return error_json(404, f"the model `{name}` does not exist", code="model_not_found", param="model")
        return json_response(self._model_entry(name))

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of the inference routes. Which models are served is told only
        to a caller that may use them (as /v1/models); the shapes are public."""
        by_endpoint: dict[str, list[str]] = {}
        if self._key_ok(request):
            for name in self.pool.models:
                serves = self.table.endpoints.get(name)
                for endpoint in ENDPOINTS:
                    if serves is None or endpoint in serves:
                        by_endpoint.setdefault(endpoint, []).append(name)
        return json_response(openapi_document(by_endpoint))

    def _model_entry(self, name: str) -> dict[str, Any]:
        m = self.pool.models[name]
        return {"id": name, "object": "model", "created": 0, "owned_by": "modelfleet",
                "instances": sum(1 for i in m.instances if i.enabled)}

    async def method_not_allowed(self, _: Request) -> Response:
        return error_json(405, "use POST")

    def _admin_ok(self, request: Request) -> bool:
        """Status lists instance endpoints: with an admin token set, only its holder sees it."""
        if not self.s.admin_token:
            return True
        token = bearer_token(request.headers.get("authorization", "").encode())
        return token is not None and hmac.compare_digest(token.encode(), self.s.admin_token.encode())

    async def status(self, request: Request) -> Response:
        if not self._admin_ok(request):
            return error_json(401, "admin token required (Authorization: Bearer …)", code="missing_token")
        buckets = request.query_params.get("buckets", "30")
        if not buckets.isdigit():
            return error_json(400, "buckets must be a whole number", param="buckets")
        return json_response(self.status_view(int(buckets)))

    def status_view(self, buckets: int = 30) -> dict[str, Any]:
        now_m, now = time.monotonic(), time.time()
        s = self.s
        models = []
        for name in sorted(self.pool.models):
            m = self.pool.models[name]
            insts = [{
                "id": i.id, "worker_id": i.worker_id, "endpoint": i.endpoint, "weight": i.weight,
                "max_concurrency": i.max_concurrency, "enabled": i.enabled, "in_flight": i.in_flight,
                "ejected": i.ejected(now_m), "ejected_for_s": round(max(0.0, i.ejected_until - now_m), 3),
                "consecutive_failures": i.failures, "ejections": i.ejections, "attempts": i.attempts,
                "failed_attempts": i.failed_attempts,
            } for i in m.instances]
            models.append({"name": name, "in_flight": m.in_flight, "queued": len(m.waiters), "slots": m.slots,
                           "routing": "prefix" if m.prefixes is not None else "p2c",
                           "prefix_blocks": len(m.prefixes) if m.prefixes is not None else 0,
                           "mean_latency_s": round(m.latency_ewma, 4), "instances": insts,
                           "recent": self.stats.series(name, now, buckets)})
        return {
            "gateway": s.gateway_id, "version": __version__, "pid": os.getpid(),
            "process": self.process_index, "processes": s.processes,
            "started_at": self.started_at, "uptime_s": round(now - self.started_at, 1),
            "route_table": self._table_view(),
            "auth": "api_keys" if self.table.auth_required else "open",
            "upstream_connections": self.proxy.upstream.stats(),
            "recent_bucket_s": self.stats.bucket_s,
            "models": models,
        }

    async def cluster(self, request: Request) -> Response:
        """Pass-through to a healthy controller, so the browser talks only to the gateway."""
        if not self.s.controller_list:
            return error_json(503, "this gateway has no controller configured", code="no_controller")
        path = cluster_path(request.scope.get("raw_path") or request.scope["path"].encode())
        if path is None:
            return error_json(400, "not a cluster path: the path under /v1/cluster/ must be plain segments "
                              "(no empty, '.' or '..' segment, no backslash)", code="invalid_path")
        headers = {k: v for k in CLUSTER_FORWARD if (v := request.headers.get(k)) is not None}
        body = await request.body()
        try:
            status, data, ctype = await self.watcher.request(
                request.method, path, headers=headers,
                data=body or None, params=list(request.query_params.multi_items()), timeout_s=30.0)
        except ConnectionError as exc:
            return error_json(503, str(exc), code="no_controller")
        if status in (204, 304):
            return Response(status_code=status)
        return Response(data, status_code=status, media_type=ctype or None)

    async def index(self, _: Request) -> Response:
        index = UI_DIR / "index.html"
        if index.is_file():
            return FileResponse(index)
        return json_response({"name": "modelfleet gateway", "version": __version__,
                              "console": "not installed (src/modelfleet/ui/static/index.html)",
                              "openai_base_url": "/v1"})


def _stamped(send: Send) -> Send:
    """Every answer names its instance (none here) and the gateway's overhead."""
    t0 = time.perf_counter()

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            ms = (time.perf_counter() - t0) * 1000
            message["headers"] = [*message.get("headers", []), (b"x-modelfleet-instance", b"-"),
                                  (b"x-modelfleet-overhead-ms", b"%.3f" % ms)]
        await send(message)

    return wrapped


def create_app(settings: GatewaySettings, process_index: int = 0) -> GatewayApp:
    """The ASGI app of one gateway process (serve it with uvicorn, or use run_gateway)."""
    return GatewayApp(settings, process_index)
