"""Small pieces shared by our own runner servers (embeddings, transformers): OpenAI error
bodies, JSON in and out, /v1/models and /health, and how they are served.

The servers are raw Starlette apps rather than FastAPI ones: they have three routes
each, and validating by hand lets every error leave in the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` with the offending field named.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelfleet.worker.runners.request_log import RequestLog

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 503: "service_unavailable"}


class ApiError(Exception):
    """Raised in a handler: answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> Response:
    body = {"error": {"message": message,
                      "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code}}
    return json_response(body, status)


def json_response(body: Any, status: int = 200) -> Response:
    # orjson writes numpy float32 arrays directly and fast: embeddings are mostly floats.
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


async def read_json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def models_payload(name: str, created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "modelfleet"}]}


def build_app(name: str, routes: list[Route], *, lifespan: Callable[..., Any] | None = None) -> Starlette:
    """An app with the given routes plus /v1/models and /health, errors in OpenAI shape."""
    created = int(time.time())

    async def models(_: Request) -> Response:
        return json_response(models_payload(name, created))

    async def health(_: Request) -> Response:
        return json_response({"status": "ok", "model": name})

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail))

    async def server_error(_: Request, exc: Exception) -> Response:
        logging.getLogger("modelfleet.runner").exception("request failed")
        return error_response(500, f"internal error in the runner: {type(exc).__name__}: {exc}")

    all_routes = [*routes, Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=all_routes, lifespan=lifespan, middleware=[Middleware(RequestLog)],
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})


def runner_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every runner of ours takes (each adds its own after)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--model-name", required=True, help="the name clients send (and /v1/models lists)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    return ap


def start_runner(args: argparse.Namespace) -> logging.Logger:
    """Offline, logging, and a model folder that exists, or exit 2 with a line saying which."""
    # Set here too, so the runner is offline even when started by hand.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    log = setup_logging()
    if not os.path.isdir(args.model_path):
        log.error("model path does not exist: %s", args.model_path)
        raise SystemExit(2)
    return log


def setup_logging() -> logging.Logger:
    # The runner's stdout is its log file (the Supervisor redirects it); format (text or JSON)
    # and level as the worker's, inherited through MODELFLEET_LOG_FORMAT / _LEVEL (logs.py).
    from modelfleet.logs import setup_logging as setup

    try:
        setup("runner", os.environ.get("MODELFLEET_LOG_LEVEL") or "INFO", stream=sys.stdout)
    except ValueError:
        setup("runner", "INFO", "text", stream=sys.stdout)
    return logging.getLogger("modelfleet.runner")


def serve(app: Starlette, host: str, port: int) -> None:
    import uvicorn

    # No uvicorn access log: RequestLog writes the one line per request, with its request id.
    # log_level None: uvicorn's loggers keep the levels logs.py gave them (WARNING unless debug).
    uvicorn.run(app, host=host, port=port, log_level=None, access_log=False, timeout_graceful_shutdown=5,
                log_config=None)
