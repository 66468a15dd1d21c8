"""Bounds on how long a client may hold a connection without making progress.

uvicorn bounds none of these: a connection that never finishes its request headers (or
never sends a byte), a request body that stops arriving, and a client that stops reading
its answer all hold their connection forever, and the last one also holds an instance's
slot: the gateway's ``send`` waits on uvicorn's flow control (``FlowControl.drain``, until
the transport's write buffer falls below its low-water mark) and, while it waits, stops
reading the instance's stream, so backpressure pauses the instance too. Open as many
stalled streams as a model has slots and every other client gets 429.

The three timeouts are nginx's (same names, same meaning):

- ``client_header_timeout_s``: from a request's first byte (or the connection's opening)
  to the end of its headers. Absolute, so a client that trickles a byte now and then
  (slowloris) is cut too.
- ``client_body_timeout_s``: longest silence between two reads of a request body.
- ``send_timeout_s``: longest time the answer's write buffer stays full (the transport
  paused writing and not resumed): the client takes nothing of what we have for it.

Any of them closes the connection at once (``transport.abort()``: nothing buffered is
flushed). The request's disconnect path does the rest, as when a client hangs up: its
upstream connection is closed, so the instance stops working for nobody, and its slot is
freed.

They live in the HTTP protocol, where the reads and write pauses are seen, not in the
request handler: no timer per chunk on the request path. One timer per connection at most,
re-armed lazily: when it fires it acts on the nearest deadline and re-arms for the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

IDLE, HEADERS, BODY = 0, 1, 2
PHASE_NAMES = {HEADERS: "headers", BODY: "body"}


@dataclass(frozen=True)
class ClientTimeouts:
    header_s: float = 30.0
    body_s: float = 30.0
    send_s: float = 30.0


def next_deadline(
    phase: int, phase_start: float, last_data: float, paused_at: float | None, t: ClientTimeouts
) -> tuple[float, str] | None:
    """The nearest deadline of a connection and what it bounds; None when nothing is pending
    (between requests on a kept-alive connection: uvicorn's keep-alive timeout covers that)."""
    best: tuple[float, str] | None = None
    if phase == HEADERS:
        best = (phase_start + t.header_s, "headers")
    elif phase == BODY:
        best = (last_data + t.body_s, "body")
    if paused_at is not None and (best is None or paused_at + t.send_s < best[0]):
        best = (paused_at + t.send_s, "send")
    return best


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the three client timeouts. Configured per server by
    ``guarded_protocol`` (uvicorn builds one protocol object per connection)."""

    timeouts = ClientTimeouts()
    on_timeout: Callable[[str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = IDLE
        self._phase_start = 0.0
        self._last_data = 0.0
        self._paused_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- what the deadlines follow
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase, self._phase_start = HEADERS, self.loop.time()  # the first request must come
        self._arm(self._phase_start + self.timeouts.header_s)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._phase_start = HEADERS, self._last_data or self.loop.time()
        self._arm(self._phase_start + self.timeouts.header_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = BODY  # silence between body reads is bounded from here (the timer is armed)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = IDLE

    def pause_writing(self) -> None:
        super().pause_writing()
        self._paused_at = self.loop.time()
        self._arm(self._paused_at + self.timeouts.send_s)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._paused_at = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    # -- the timer
    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first and re-arms for whatever is due then
            timer.cancel()
        self._timer = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        due = next_deadline(self._phase, self._phase_start, self._last_data, self._paused_at, self.timeouts)
        if due is None:
            return
        when, what = due
        if self.loop.time() < when:
            self._timer = self.loop.call_at(when, self._check)
            return
        if self.on_timeout is not None:
            self.on_timeout(what)
        self.transport.abort()  # connection_lost follows: the request's disconnect path frees its slot


def guarded_protocol(
    timeouts: ClientTimeouts, on_timeout: Callable[[str], None] | None = None
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for these timeouts."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"timeouts": timeouts, "on_timeout": staticmethod(on_timeout) if on_timeout else None},
    )
