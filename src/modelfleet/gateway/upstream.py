"""A lean HTTP/1.1 client for instances: pooled keep-alive connections, httptools parsing.

Why not aiohttp's client: on the request path it cost about as much CPU as everything
else together (request/response objects, header multidicts, tracing hooks, cookie and
redirect handling), none of which a reverse proxy to a known OpenAI-compatible server
needs. This does one thing: send a prepared POST on an idle connection (or a new one),
hand back status and headers, then the body in one piece or chunk by chunk as it arrives.

The body is de-chunked by the parser (the client gets its own chunked framing from
uvicorn) but never decoded or re-encoded. A connection goes back to the pool only after a
complete response with keep-alive; anything else (an error, a cancelled read, a
half-read body) closes it, so the instance sees the disconnect at once.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools

# Close pooled connections unused for this long: under llama-server's own idle limit (its
# HTTP library, cpp-httplib, closes a keep-alive connection after 5 s), so the pool never
# sends a request on a connection the server is closing at that moment.
IDLE_CLOSE_S = 4.0
MAX_BUFFER = 1 << 20  # stop reading from an instance while this much waits for a slow client

Endpoint = tuple[str, int, bool]  # host, port, TLS


class UpstreamError(Exception):
    """Connection failed, broke, or timed out. ``before_response`` tells whether any byte of
    the response had arrived (if not, nothing can have reached the client either)."""

    def __init__(self, message: str, before_response: bool = True, timeout: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.timeout = timeout


class Connection(asyncio.Protocol):
    __slots__ = (
        "_body", "_buffered", "_complete", "_eof_body", "_error", "_headers_fut", "_paused", "_waiter",
        "endpoint", "headers", "keep_alive", "last_used", "parser", "pool", "status", "transport",
    )

    def __init__(self, pool: UpstreamPool, endpoint: Endpoint) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.last_used = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self._headers_fut: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._eof_body = False  # no Content-Length, not chunked: the body ends at EOF

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad HTTP response: {exc}", before_response=self.status == 0))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._forget(self)
        if self._complete:
            return
        if self.status and self._eof_body and exc is None:
            self.on_message_complete()
            return
        what = "connection closed" if exc is None else f"connection lost ({exc})"
        before = self.status == 0
        self._fail(UpstreamError(f"{what} {'before the response' if before else 'in the middle of the body'}",
                                 before_response=before))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        names = {n.lower() for n, _ in self.headers}
        self._eof_body = b"content-length" not in names and b"transfer-encoding" not in names \
            and self.status not in (204, 304) and not 100 <= self.status < 200
        if self._headers_fut is not None and not self._headers_fut.done():
            self._headers_fut.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > MAX_BUFFER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # -- helpers
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        self._error = err
        f = self._headers_fut
        if f is not None and not f.done():
            f.set_exception(err)
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(err)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- client side
    async def send(self, data: bytes, header_timeout: float | None) -> None:
        """Write a request and wait for the response headers."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._headers_fut = fut = loop.create_future()
        self.transport.write(data)
        timer = loop.call_later(header_timeout, self._timeout, fut) if header_timeout else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()

    def _timeout(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_exception(UpstreamError("timed out before the response headers", timeout=True))
            self.close()

    async def _next(self, read_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = w = loop.create_future()
        timer = loop.call_later(read_timeout, self._stalled, w)
        try:
            await w
        finally:
            timer.cancel()
            self._waiter = None

    def _stalled(self, w: asyncio.Future[None]) -> None:
        if not w.done():
            w.set_exception(UpstreamError("no data from the instance for too long", before_response=False,
                                          timeout=True))
            self.close()

    def _take(self) -> bytes:
        chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def read_all(self, read_timeout: float) -> bytes:
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._next(read_timeout)
        return self._take() if self._body else b""

    async def read_chunk(self, read_timeout: float) -> bytes | None:
        """Whatever arrived since the last call (at least one byte), or None at the end."""
        while not self._body:
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._next(read_timeout)
        return self._take()

    def release(self) -> None:
        """Back to the pool if the response is complete and the connection reusable."""
        if self._complete and self.keep_alive and self._error is None and self.transport is not None \
                and not self.transport.is_closing():
            self._reset()
            self.last_used = time.monotonic()
            self.pool._idle.setdefault(self.endpoint, []).append(self)
        else:
            self.close()


class UpstreamPool:
    def __init__(self, connect_timeout: float, header_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.header_timeout = header_timeout
        self.read_timeout = read_timeout
        self._idle: dict[Endpoint, list[Connection]] = {}
        self._prefix: dict[tuple[str, str], tuple[Endpoint, bytes]] = {}
        self._all: set[Connection] = set()
        self._tls: ssl.SSLContext | None = None

    def _target(self, base_url: str, path: str) -> tuple[Endpoint, bytes]:
        """(host, port, tls) and the request head up to Content-Length, cached per URL."""
        key = (base_url, path)
        t = self._prefix.get(key)
        if t is None:
            u = urlsplit(base_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise UpstreamError(f"unsupported instance endpoint {base_url!r} (http:// or https://)")
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            full = (u.path.rstrip("/") + path).encode()
            head = (b"POST " + full + b" HTTP/1.1\r\nHost: " + u.netloc.encode()
                    + b"\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream"
                    + b"\r\nContent-Length: ")
            t = self._prefix[key] = ((u.hostname, port, tls), head)
        return t

    async def _connect(self, endpoint: Endpoint, fresh: bool = False) -> Connection:
        loop = asyncio.get_running_loop()
        idle = None if fresh else self._idle.get(endpoint)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                if now - conn.last_used < IDLE_CLOSE_S:
                    return conn
                conn.close()
        host, port, tls = endpoint
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(lambda: Connection(self, endpoint), host, port,
                                                        ssl=self._tls if tls else None)
        except TimeoutError:
            raise UpstreamError(f"connect to {endpoint[0]}:{endpoint[1]} timed out", timeout=True) from None
        except OSError as exc:
            raise UpstreamError(f"connect to {endpoint[0]}:{endpoint[1]} failed: {exc.strerror or exc}") from None
        self._all.add(proto)
        return proto

    async def post(self, base_url: str, path: str, body: bytes, extra_headers: bytes = b"") -> Connection:
        """Send ``body`` to ``base_url + path``; returns the connection once headers are in.
        ``extra_headers``: whole header lines (``Name: value\\r\\n``), such as the request id.
        The caller reads the body, then ``release()``s it (or ``close()``s on any trouble)."""
        endpoint, head = self._target(base_url, path)
        request = head + b"%d\r\n" % len(body) + extra_headers + b"\r\n" + body
        conn = await self._connect(endpoint)
        reused = conn.last_used > 0
        try:
            await conn.send(request, self.header_timeout)
        except UpstreamError as exc:
            conn.close()
            if not (reused and exc.before_response and not exc.timeout):
                raise
            # A pooled connection that the instance closed as we reused it, before any byte of
            # an answer: the request was not read. llama-server does this after every streamed
            # answer although it said keep-alive. Once more on a new connection, so that it
            # costs no retry on another instance and no failure against this one.
            conn = await self._connect(endpoint, fresh=True)
            try:
                await conn.send(request, self.header_timeout)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.endpoint)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._all), "idle": sum(len(v) for v in self._idle.values())}
