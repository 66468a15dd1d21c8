"""A scripted OpenAI-compatible server for tests and benchmarks (never a default runner).

It answers /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings with
fixed content, and its behaviour is scripted at start (flags) or at run time
(``POST /_control`` with the same names as JSON):

- ``latency``: seconds before the response headers (a model "thinking");
- ``tokens`` and ``token_interval``: how many content chunks a completion has and the
  pause between two stream chunks (the token rate is 1/token_interval);
- ``status`` and ``fail_count``: answer ``status`` with an OpenAI error body, for the next
  ``fail_count`` requests (-1: until told otherwise);
- ``hang``: accept requests and never answer (a timeout before headers);
- ``crash_after_chunks``: a stream sends that many chunks, then the process dies at once
  (``os._exit``, as abrupt as kill -9 for the peer); ``POST /_crash`` dies now;
- ``pad``: bytes of filler in each stream chunk's content (big answers, fast: a client that
  stops reading fills the socket buffers within a few chunks).

``GET /_stats`` reports what it saw, disconnects included: a request whose client went
away before the answer was complete counts in ``disconnects``, which is how a test proves
that a proxy cancelled the upstream call. ``POST /_reset`` zeroes the counters.

Run: ``python -m tests.fakes.scripted_upstream --port 9001 --name a --latency 0.01``;
or in-process: ``await ScriptedUpstream(port=0).start()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Script:
    name: str = "upstream"
    latency: float = 0.0
    tokens: int = 8
    token_interval: float = 0.0
    status: int = 200
    fail_count: int = -1  # with status != 200: how many requests fail (-1: all)
    hang: bool = False
    crash_after_chunks: int | None = None
    embedding_dim: int = 8
    pad: int = 0

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for k, v in values.items():
            if k not in known:
                raise ValueError(f"unknown script field {k!r}")
            setattr(self, k, v)


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    failed_on_purpose: int = 0
    disconnects: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    streams: int = 0


class ScriptedUpstream:
    """The server. ``start()`` binds 127.0.0.1:``port`` (0 picks a free port)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", **script: Any) -> None:
        self.host, self.port = host, port
        self.script = Script()
        self.script.update(script)
        self.stats = Stats()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/health", self.health)
        app.router.add_get("/_stats", self.get_stats)
        app.router.add_post("/_control", self.control)
        app.router.add_post("/_reset", self.reset)
        app.router.add_post("/_crash", self.crash)
        return app

    async def start(self) -> ScriptedUpstream:
        # handler_cancellation: a client that goes away cancels the handler, so we can count it.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None and server.sockets  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- control ---------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "name": self.script.name})

    async def get_stats(self, _: web.Request) -> web.Response:
        return web.json_response({**asdict(self.stats), "script": asdict(self.script)})

    async def control(self, request: web.Request) -> web.Response:
        try:
            self.script.update(await request.json())
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.script))

    async def reset(self, _: web.Request) -> web.Response:
        self.stats = Stats()
        return web.json_response(asdict(self.stats))

    async def crash(self, _: web.Request) -> web.Response:
        os._exit(137)

    # -- OpenAI surface ----------------------------------------------------------------
    async def models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.script.name, "object": "model", "owned_by": "scripted"}]}
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "text")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "embedding")

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        st = self.stats
        st.requests += 1
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            body = orjson.loads(await request.read())
            resp = await self._answer(request, kind, body)
            st.completed += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            st.disconnects += 1
            raise
        finally:
            st.in_flight -= 1

    def _take_failure(self) -> bool:
        s = self.script
        if s.status == 200 or s.fail_count == 0:
            return False
        if s.fail_count > 0:
            s.fail_count -= 1
        return True

    async def _answer(self, request: web.Request, kind: str, body: dict[str, Any]) -> web.StreamResponse:
        s = self.script
        headers = {"x-upstream-name": s.name}
        # What the caller sent as X-Request-ID, echoed: a test sees the id the instance got.
        headers["x-upstream-request-id"] = request.headers.get("x-request-id", "")
        if s.hang:
            await asyncio.Event().wait()
        if s.latency:
            await asyncio.sleep(s.latency)
        if self._take_failure():
            self.stats.failed_on_purpose += 1
            err = {"error": {"message": f"scripted failure from {s.name}", "type": "server_error",
                             "param": None, "code": s.status}}
            return web.Response(body=orjson.dumps(err), status=s.status, content_type="application/json",
                                headers=headers)
        model = body.get("model", s.name)
        prompt_tokens = _count_tokens(body)
        if kind == "embedding":
            inputs = body.get("input", "")
            items = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i,
                     "embedding": [round(0.1 * (i + 1) + 0.01 * d, 4) for d in range(s.embedding_dim)]}
                    for i in range(len(items))]
            out = {"object": "list", "data": data, "model": model,
                   "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
            return web.Response(body=orjson.dumps(out), content_type="application/json", headers=headers)
        n = int(body.get("max_tokens") or s.tokens)
        n = min(n, s.tokens) if s.tokens else n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        created = int(time.time())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{s.name}-{self.stats.requests}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, kind, rid, created, model, n, usage if include_usage else None,
                                      headers)
        text = " ".join(f"tok{i}" for i in range(n))
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop", "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
               "usage": usage, "system_fingerprint": s.name}
        return web.Response(body=orjson.dumps(out), content_type="application/json", headers=headers)

    async def _stream(self, request: web.Request, kind: str, rid: str, created: int, model: str, n: int,
                      usage: dict[str, int] | None, headers: dict[str, str]) -> web.StreamResponse:
        s = self.script
        self.stats.streams += 1
        resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None) -> bytes:
            if kind == "chat":
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if i == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            c = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                 "system_fingerprint": s.name}
            return b"data: " + orjson.dumps(c) + b"\n\n"

        filler = "x" * s.pad
        for i in range(n):
            if s.crash_after_chunks is not None and i >= s.crash_after_chunks:
                os._exit(137)
            await resp.write(chunk(i, f"tok{i} {filler}", None))
            if s.token_interval:
                await asyncio.sleep(s.token_interval)
        await resp.write(chunk(n, None, "stop"))
        if usage is not None:
            u = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _count_tokens(body: dict[str, Any]) -> int:
    """A stand-in tokenizer: words in the prompt, messages or input."""
    parts: list[str] = []
    for m in body.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            parts.append(m["content"])
    for key in ("prompt", "input"):
        v = body.get(key)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(x for x in v if isinstance(x, str))
    return max(1, sum(len(p.split()) for p in parts))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="upstream")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--token-interval", type=float, default=0.0)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--fail-count", type=int, default=-1)
    p.add_argument("--hang", action="store_true")
    p.add_argument("--crash-after-chunks", type=int, default=None)
    p.add_argument("--pad", type=int, default=0)
    a = p.parse_args(argv)
    script = {k: v for k, v in vars(a).items() if k not in ("host", "port")}

    async def serve() -> None:
        up = await ScriptedUpstream(port=a.port, host=a.host, **script).start()
        print(f"scripted upstream {a.name} on {up.url}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
