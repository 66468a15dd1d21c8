"""The request path: a raw ASGI handler that forwards inference calls to an instance.

Kept lean on purpose (it is what the benchmark measures): no framework routing or
dependency injection, one orjson parse of the request body to read ``model`` and
``stream``, the body forwarded as received, the answer passed back untouched: a
non-streamed body in one piece, a stream chunk by chunk as each arrives from the socket
(never re-split into events, never re-encoded). Pooled keep-alive connections to instances
(upstream.py).

Failure handling (DESIGN principle 7): connect errors, timeouts before headers, 429/502/
503/504 and a body that breaks before anything reached the client are retried on another
instance, at most ``max_attempts`` in all and only while ``retry_budget_s`` has not run
out. Once bytes went to the client, a broken stream ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

import orjson

from modelfleet.errors import error_body
from modelfleet.gateway import ejection
from modelfleet.gateway.access import CURRENT as CURRENT_REQUEST
from modelfleet.gateway.auth import key_allowed
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.pool import Inst, ModelState, NoInstance, Overloaded, Pool
from modelfleet.gateway.prefix import PrefixKey, request_key
from modelfleet.gateway.routes import RouteTable
from modelfleet.gateway.settings import GatewaySettings
from modelfleet.gateway.stats import RecentStats
from modelfleet.gateway.upstream import Connection, UpstreamError, UpstreamPool
from modelfleet.gateway.validate import CHAT, COMPLETIONS, EMBEDDINGS, check, wrong_endpoint

log = logging.getLogger("modelfleet.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

# Response headers of an instance passed to the client: those that describe the answer
# (plus x-* and openai-* ones). Connection headers are hop-by-hop, and what a static server
# adds (etag, last-modified, accept-ranges) means nothing for an API answer; each header also
# costs time on the request path.
PASS_HEADERS = frozenset({b"content-type", b"content-encoding", b"cache-control", b"retry-after", b"vary"})
PASS_PREFIXES = (b"x-", b"openai-")
STATUS_CLIENT_GONE = 499  # nginx's convention, for metrics only: nothing is sent
ENDPOINT_OF = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS}

_PROMPT_RE = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def usage_tokens(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from the last "usage" object in ``data``, without parsing
    the whole answer: a bounded regex look after the last occurrence of the key."""
    i = data.rfind(b'"usage"')
    if i < 0:
        return None, None
    window = data[i:i + 600]
    p = _PROMPT_RE.search(window)
    c = _COMPLETION_RE.search(window)
    return (int(p.group(1)) if p else None), (int(c.group(1)) if c else None)


def sse_error(message: str, code: str) -> bytes:
    return b"data: " + orjson.dumps(error_body(502, message, code=code)) + b"\n\n"


def can_retry(attempt: int, started: float, now: float, max_attempts: int, budget_s: float) -> bool:
    return attempt < max_attempts and now - started < budget_s


class ClientGone(Exception):
    """The client disconnected."""


class _Watch:
    """Cancels the request's task when the client disconnects (so its upstream call is
    cancelled, its connection closed and its slot freed), unless the answer is complete."""

    __slots__ = ("done", "gone", "task")

    def __init__(self) -> None:
        self.done = False
        self.gone = False
        self.task: asyncio.Task[None] | None = None

    async def run(self, receive: Receive, owner: asyncio.Task[Any]) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not self.done:
                    self.gone = True
                    owner.cancel()
                return


class Proxy:
    def __init__(self, settings: GatewaySettings, pool: Pool, metrics: GatewayMetrics, stats: RecentStats,
                 table: Callable[[], RouteTable]) -> None:
        self.s = settings
        self.pool = pool
        self.metrics = metrics
        self.stats = stats
        self.table = table
        self.upstream = UpstreamPool(settings.connect_timeout_s, settings.header_timeout_s, settings.read_timeout_s)

    def stop(self) -> None:
        self.upstream.close()

    # -- entry ------------------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        t0 = perf_counter()
        auth = length = session_id = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"content-length":
                length = v
            elif k == b"x-session-id":
                session_id = v
        table = self.table()
        if not key_allowed(auth, table.key_hashes, table.auth_required):
            return await self.fail(send, t0, "", 401, "invalid or missing API key (Authorization: Bearer …)",
                                   code="invalid_api_key")
        limit = self.s.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return await self.fail(send, t0, "", 413, f"request body larger than {limit} bytes",
                                   code="request_too_large")
        try:
            body = await read_body(receive, limit)
        except ClientGone:
            return None
        if body is None:
            return await self.fail(send, t0, "", 413, f"request body larger than {limit} bytes",
                                   code="request_too_large")
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return await self.fail(send, t0, "", 400, f"malformed JSON in request body: {exc}",
                                   code="invalid_json")
        model = req.get("model") if type(req) is dict else None
        if type(model) is not str or not model:
            return await self.fail(send, t0, "", 400, "the request body must be a JSON object with a "
                                   "\"model\" string", param="model", code="invalid_request")
        m = self.pool.models.get(model)
        if m is None and not self.pool.loaded.is_set():
            m = await self.first_table(model, t0, receive)
        if m is None:
            # Metrics label it "-": a label per unknown name would let clients grow the series forever.
            return await self.fail(send, t0, "", 404, f"the model `{model}` does not exist",
                                   param="model", code="model_not_found")
        # Refused here, a bad request never reaches a runner (which answers 500, or even 200).
        endpoint = ENDPOINT_OF[path]
        serves = table.endpoints.get(model)
        bad = wrong_endpoint(model, endpoint, serves) if serves is not None and endpoint not in serves else \
            check(endpoint, req)
        if bad is not None:
            return await self.fail(send, t0, model, 400, bad.message, param=bad.param, code=bad.code)
        stream = req.get("stream") is True
        # Prefix routing: the prompt's block chain, hashed once (never for embeddings).
        key = request_key(endpoint, req) if m.prefixes is not None else None

        task = asyncio.current_task()
        assert task is not None
        watch = _Watch()
        watcher = asyncio.get_running_loop().create_task(watch.run(receive, task))
        try:
            await self.forward(send, t0, m, path, body, stream, session_id, watch, key)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task.uncancel()
            self.record(model, STATUS_CLIENT_GONE, t0)
        finally:
            watch.done = True
            watcher.cancel()

    async def first_table(self, model: str, t0: float, receive: Receive) -> ModelState | None:
        """Before this gateway's first route table (no snapshot, no controller answer yet) it
        cannot tell an unknown model from one it has not heard of yet: hold the request up to
        the cold-start wait for the table, then judge it. A client that leaves meanwhile ends
        the wait (its disconnect message is read here)."""
        waiting = asyncio.ensure_future(self.pool.wait_loaded(self.s.cold_start_wait_s - (perf_counter() - t0)))
        gone = asyncio.ensure_future(receive())
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            gone.cancel()
        return self.pool.models.get(model)

    # -- forwarding -------------------------------------------------------------------------
    async def forward(self, send: Send, t0: float, m: ModelState, path: str, body: bytes, stream: bool,
                      session_id: bytes | None, watch: _Watch, key: PrefixKey | None = None) -> None:
        s, pool = self.s, self.pool
        post = self.upstream.post
        read_timeout = s.read_timeout_s
        tried: tuple[str, ...] = ()
        attempt = 0
        waited = 0.0  # seconds in the queue and at instances: not gateway overhead
        relay: tuple[int, bytes, Any, Inst] | None = None  # the last refusal of an instance
        last_problem = ""
        rec = CURRENT_REQUEST.get()  # access.RequestEdge: the request id for the instance, attempts
        request_id = rec.upstream_header if rec is not None else b""
        while True:
            inst = pool.try_acquire(m, tried, session_id, key)
            if inst.__class__ is not Inst:
                tq = perf_counter()
                try:
                    inst = await pool.acquire(m, tried, session_id, s.retry_budget_s - (tq - t0), key,
                                              s.cold_start_wait_s - (tq - t0))
                except Overloaded as exc:
                    if relay is not None:
                        return await self.respond(send, t0, m.name, *relay, waited, watch)
                    return await self.fail(send, t0, m.name, 429, str(exc), code="overloaded",
                                           retry_after=exc.retry_after)
                except NoInstance as exc:
                    if relay is not None:
                        return await self.respond(send, t0, m.name, *relay, waited, watch)
                    msg = str(exc) + (f" (last failure: {last_problem})" if last_problem else "")
                    return await self.fail(send, t0, m.name, 503, msg, code="no_healthy_instance",
                                           retry_after=exc.retry_after)
                waited += perf_counter() - tq
            assert isinstance(inst, Inst)
            attempt += 1
            if rec is not None:
                rec.attempts = attempt
            tu = perf_counter()
            problem = ""
            timed_out = False
            status = 0
            data = b""
            headers: list[tuple[bytes, bytes]] = []
            conn: Connection | None = None
            streaming = False
            try:
                # Nothing has reached the client inside this scope: the pool expires it when
                # the instance leaves the route table (see Pool.apply), and we fail over.
                async with asyncio.timeout(None) as abort:
                    inst.aborts.add(abort)
                    try:
                        conn = await post(inst.endpoint, path, body, request_id)
                        status = conn.status
                        streaming = stream and status == 200
                        if not streaming:
                            # Not streamed (or refused): read it all. A break here is still
                            # retryable, since nothing has reached the client.
                            data = await conn.read_all(read_timeout)
                            headers = conn.headers  # release() starts a new list for the next response
                            conn.release()
                    finally:
                        inst.aborts.discard(abort)
            except UpstreamError as exc:
                problem, timed_out, status = str(exc), exc.timeout, 0
                if conn is not None:
                    conn.close()
            except TimeoutError:
                # Only the abort scope raises this (upstream timeouts are UpstreamError).
                problem, status = "instance left the route table (worker gone?) before answering", 0
                if conn is not None:
                    conn.close()
            except BaseException:
                # Cancelled (the client went away): close the upstream connection, so the
                # instance sees the disconnect and stops working for nobody; free the slot.
                if conn is not None:
                    conn.close()
                pool.release(inst)
                raise
            if streaming and not problem and conn is not None:
                # stream() owns the slot and the connection now; nothing can be retried.
                return await self.stream(send, t0, m.name, conn, inst, waited + perf_counter() - tu, watch)
            waited += perf_counter() - tu
            if status and not ejection.is_retryable_status(status):
                # An answer: a success, or the instance's own error (4xx, 500) for the client.
                pool.release(inst)
                if status < 500:
                    pool.succeeded(inst, perf_counter() - tu)
                return await self.respond(send, t0, m.name, status, data, headers, inst, waited, watch)
            if status:
                problem = f"HTTP {status}"
                relay = (status, data, headers, inst)
            pool.failed(inst, problem)  # before release: a queued request must not get an ejected one
            pool.release(inst)
            last_problem = f"{inst.id}: {problem}"
            tried += (inst.id,)
            if can_retry(attempt, t0, perf_counter(), s.max_attempts, s.retry_budget_s):
                self.metrics.retries.labels(m.name, "timeout" if timed_out else f"HTTP {status}" if status
                                            else "connection").inc()
                continue
            if relay is not None:
                return await self.respond(send, t0, m.name, *relay, waited, watch)
            return await self.fail(send, t0, m.name, 504 if timed_out else 502,
                                   f"upstream {'timed out' if timed_out else 'failed'} after {attempt} "
                                   f"attempt(s); last: {last_problem}", code="upstream_error", instance=inst.id)

    async def stream(self, send: Send, t0: float, model: str, conn: Connection, inst: Inst,
                     waited: float, watch: _Watch) -> None:
        """Pass an SSE stream through as it arrives. Nothing can be retried from here on."""
        prev = last = b""
        broken = ""
        tu = perf_counter()
        read_timeout = self.s.read_timeout_s
        complete = False
        try:
            headers = self.response_headers(conn.headers, inst, t0, waited)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            chunk = await conn.read_chunk(read_timeout)
            if chunk is not None:
                self.metrics.observe_ttft(model, perf_counter() - t0)
            while chunk is not None:
                prev, last = last, chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await conn.read_chunk(read_timeout)
            complete = True
        except UpstreamError as exc:
            broken = str(exc)
        finally:
            # Also on cancellation (client gone): the connection closes, the slot frees.
            if complete:
                conn.release()
            else:
                conn.close()
            if broken:
                self.pool.failed(inst, f"stream broken: {broken}")
            self.pool.release(inst)
        if broken:
            self.metrics.stream_errors.labels(model).inc()
            log.info("stream from instance %s broke after its first byte: %s", inst.id, broken)
            await send({"type": "http.response.body", "more_body": True, "body": sse_error(
                f"the model instance stopped in the middle of the answer ({broken}); the answer is "
                "incomplete", "upstream_stream_broken")})
        else:
            self.pool.succeeded(inst, perf_counter() - tu)
        watch.done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.record(model, 200, t0)
        self.count_tokens(model, usage_tokens(prev + last))

    # -- answers ----------------------------------------------------------------------------
    def response_headers(self, raw: Any, inst: Inst | None, t0: float, waited: float,
                         extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
        headers = []
        for k, v in raw:
            k = k.lower()
            if k in PASS_HEADERS or k.startswith(PASS_PREFIXES):
                headers.append((k, v))
        headers.append((b"x-modelfleet-instance", inst.id.encode() if inst is not None else b"-"))
        overhead_ms = max(0.0, perf_counter() - t0 - waited) * 1000
        headers.append((b"x-modelfleet-overhead-ms", b"%.3f" % overhead_ms))
        if extra:
            headers.extend(extra)
        return headers

    async def respond(self, send: Send, t0: float, model: str, status: int, data: bytes, raw: Any,
                      inst: Inst, waited: float, watch: _Watch) -> None:
        """The instance's answer, body as received (on refusals: the last one, out of attempts)."""
        headers = self.response_headers(raw, inst, t0, waited, [(b"content-length", b"%d" % len(data))])
        watch.done = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        self.record(model, status, t0)
        if status == 200:
            self.count_tokens(model, usage_tokens(data))

    async def fail(self, send: Send, t0: float, model: str, status: int, message: str, *,
                   param: str | None = None, code: str | None = None, retry_after: int | None = None,
                   instance: str | None = None) -> None:
        data = orjson.dumps(error_body(status, message, param=param, code=code))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(data)),
            (b"x-modelfleet-instance", instance.encode() if instance else b"-"),
            (b"x-modelfleet-overhead-ms", b"%.3f" % ((perf_counter() - t0) * 1000)),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", b"%d" % retry_after))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        self.record(model or "-", status, t0)

    def count_tokens(self, model: str, tokens: tuple[int | None, int | None]) -> None:
        self.metrics.count_tokens(model, *tokens)
        rec = CURRENT_REQUEST.get()
        if rec is not None:
            rec.prompt_tokens, rec.completion_tokens = tokens

    def record(self, model: str, status: int, t0: float) -> None:
        elapsed = perf_counter() - t0
        rec = CURRENT_REQUEST.get()
        if rec is not None:
            rec.model = model if model != "-" else rec.model
            if status == STATUS_CLIENT_GONE:
                rec.client_gone = True
        self.metrics.count(model, status)
        if model != "-" and model in self.pool.models:
            self.metrics.observe_latency(model, elapsed)
            self.stats.add(model, status, time.time())




async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes."""
    msg = await receive()
    if msg["type"] == "http.disconnect":
        raise ClientGone
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)

