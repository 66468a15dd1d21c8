"""Request ids and the access log, at the gateway's ASGI edge.

Every HTTP request gets an id: the client's ``X-Request-ID`` when it is safe to log and pass
on (logs.valid_request_id: at most 128 characters of ``A-Za-z0-9._:/+=@-``), else a new one
(32 hex digits). The id goes back on every response the gateway sends (answers, its own
errors, streams) as ``X-Request-ID``, and the proxy sends it to the instance (runners log
it). With the access log on, every inference request ends in one log line
(``modelfleet.gateway.access``) with the request id, model, instance, status, attempts,
time to first byte, duration, tokens and whether the client went away.

The proxy adds what only it knows (model, attempts, tokens, a client gone mid-answer) to the
request's ``RequestRecord``, found through a context variable: no signature on the request
path changes, and the cost of a request without the access log is one header scan, one
context variable set and one header appended."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from time import perf_counter
from typing import Any

from modelfleet.logs import new_request_id, valid_request_id

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

access_log = logging.getLogger("modelfleet.gateway.access")

REQUEST_ID = b"x-request-id"
STATUS_CLIENT_GONE = 499  # nginx's convention: the client left before an answer was sent


class RequestRecord:
    """What the access log line says about one request; the proxy fills in its part."""

    __slots__ = (
        "attempts",
        "client_gone",
        "completion_tokens",
        "id",
        "instance",
        "model",
        "prompt_tokens",
        "status",
        "ttfb_s",
        "upstream_header",
    )

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        # The header line the proxy adds to the request it sends an instance.
        self.upstream_header = b"X-Request-ID: " + request_id.encode() + b"\r\n"
        self.model: str | None = None
        self.instance: str | None = None
        self.status: int | None = None
        self.attempts = 0
        self.ttfb_s: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.client_gone = False


CURRENT: ContextVar[RequestRecord | None] = ContextVar("modelfleet_request", default=None)


def current() -> RequestRecord | None:
    return CURRENT.get()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if valid (the first one), else a new id."""
    for k, v in headers:
        if k == REQUEST_ID:
            rid = valid_request_id(v)
            return rid if rid is not None else new_request_id()
    return new_request_id()


def access_fields(rec: RequestRecord, method: str, path: str, duration_s: float) -> dict[str, Any]:
    """The fields of an access log line (also the JSON format's keys)."""
    return {
        "request_id": rec.id,
        "method": method,
        "path": path,
        "model": rec.model,
        "instance": rec.instance,
        "status": rec.status if rec.status is not None else STATUS_CLIENT_GONE,
        "attempts": rec.attempts,
        "ttfb_ms": None if rec.ttfb_s is None else round(rec.ttfb_s * 1000, 1),
        "duration_ms": round(duration_s * 1000, 1),
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "client_disconnected": rec.client_gone or rec.status is None,
    }


def access_message(f: dict[str, Any]) -> str:
    """One line, key=value, in a fixed order (what the text format shows; `-` for unknown)."""

    def v(x: Any) -> str:
        return "-" if x is None else str(x).lower() if isinstance(x, bool) else str(x)

    return (
        f"{f['method']} {f['path']} request_id={f['request_id']} model={v(f['model'])} "
        f"instance={v(f['instance'])} status={f['status']} attempts={f['attempts']} ttfb_ms={v(f['ttfb_ms'])} "
        f"duration_ms={f['duration_ms']} prompt_tokens={v(f['prompt_tokens'])} "
        f"completion_tokens={v(f['completion_tokens'])} client_disconnected={v(f['client_disconnected'])}"
    )


class RequestEdge:
    """ASGI wrapper for HTTP requests: the id in and out, and the access log line."""

    def __init__(self, app: Any, *, access: bool, logged_paths: frozenset[str] | set[str]) -> None:
        self.app = app
        self.access = access
        self.logged_paths = logged_paths  # the inference paths: probes and the console's polls are not logged

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = perf_counter()
        rec = RequestRecord(request_id_of(scope["headers"]))
        header = (REQUEST_ID, rec.id.encode())
        log_it = self.access and scope["path"] in self.logged_paths

        async def send_with_id(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                # An instance's own X-Request-ID (vLLM echoes one) is dropped: one id, ours.
                headers = [h for h in message.get("headers", ()) if h[0].lower() != REQUEST_ID]
                headers.append(header)
                message["headers"] = headers
                rec.status = message["status"]
                if log_it:
                    for k, val in headers:
                        if k == b"x-modelfleet-instance":
                            rec.instance = None if val == b"-" else val.decode("latin-1")
            elif log_it and rec.ttfb_s is None and message.get("body"):
                rec.ttfb_s = perf_counter() - t0
            await send(message)

        token = CURRENT.set(rec)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CURRENT.reset(token)
            if log_it:
                f = access_fields(rec, scope["method"], scope["path"], perf_counter() - t0)
                access_log.info(access_message(f), extra=f)
