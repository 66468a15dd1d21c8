"""One runner log line per inference request, with the gateway's request id.

The gateway sends every request to the runner directly (the worker is not on the request
path), with ``X-Request-ID``. Our own runners (sentence-transformers, transformers) and the
llama.cpp runner (llama_cpp_server.py wraps llama-cpp-python's server) write one line per
POST into the runner log, so that ``modelfleet instances --logs ID --request RID`` finds
what the runner did with a request the gateway's access log names. Third-party servers we
start as they are (vLLM, an attached endpoint) log what they log."""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any

from modelfleet.logs import valid_request_id

log = logging.getLogger("modelfleet.runner.requests")


class RequestLog:
    """ASGI wrapper: ``request RID: POST /v1/embeddings -> 200 in 12.3 ms`` per POST."""

    def __init__(self, app: Callable[..., Any], *, hide_id: bool = False) -> None:
        self.app = app
        # hide_id: the app behind must not see X-Request-ID. llama-cpp-python's server
        # (starlette-context's RequestIdPlugin) answers 400 to one that is not a UUID.
        self.hide_id = hide_id

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        t0 = perf_counter()
        rid = "-"
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = valid_request_id(v) or "-"  # what the gateway sent is always valid
                break
        if self.hide_id:
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0] != b"x-request-id"]}
        status = 0

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ms = round((perf_counter() - t0) * 1000, 1)
            log.info(
                "request %s: %s %s -> %s in %.1f ms",
                rid,
                scope["method"],
                scope["path"],
                status or "no answer (client gone)",
                ms,
                extra={"request_id": rid, "path": scope["path"], "status": status or None, "duration_ms": ms},
            )
