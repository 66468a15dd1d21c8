"""Clients that hold a connection without making progress, against a real gateway process:
streams nobody reads (they held an instance's slots forever, so every other client got 429),
requests whose headers or body never finish (slowloris). Small timeouts through the flags."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.gateway.conftest import Cluster
from tests.support.procs import wait_for


def connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    s.connect((host, int(port)))
    return s


def request_bytes(body: dict[str, object], content_length: int | None = None) -> bytes:
    data = json.dumps(body).encode()
    n = len(data) if content_length is None else content_length
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % n
    ) + data


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length: one recv may hold only its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before the response head: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                  if k.strip().lower() == b"content-length")
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed in the middle of the body"
        body += chunk
    return head + b"\r\n\r\n" + body


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the gateway closes ``s`` (reading whatever it still sends), or None."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if s.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def metric(cluster: Cluster, line_start: str) -> float:
    for line in httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def test_streams_nobody_reads_free_their_slots(cluster: Cluster) -> None:
    cluster.controller()
    url_a = cluster.upstream("a", "--tokens", "100000", "--pad", "8192")
    cluster.start_worker().declare("w1/a", "m", url_a, max_concurrency=2)
    cluster.gateway("--send-timeout-s", "1", "--queue-len", "4", "--queue-wait-s", "30")
    cluster.wait_routable("m", 1)

    stalled = []
    for _ in range(2):  # as many as the model has slots; they read nothing at all
        s = connect(cluster.gateway_url, rcvbuf=4096)
        s.sendall(request_bytes({"model": "m", "messages": [{"role": "user", "content": "talk"}], "stream": True}))
        stalled.append(s)
    wait_for(lambda: cluster.status()["models"][0]["in_flight"] == 2, 10, what="both slots taken")

    # Another client is served within the bound: send timeout (1 s) after the buffers fill.
    t0 = time.monotonic()
    r = httpx.post(
        f"{cluster.gateway_url}/v1/chat/completions",
        timeout=60,
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text  # before: a 429 after the 30 s queue wait, and forever after
    assert time.monotonic() - t0 < 20  # the send timeout after the buffers fill; the queue wait is 30 s
    # Both stalled streams are cut (reading them now would make them progress: look first).
    wait_for(lambda: cluster.upstream_stats("a")["disconnects"] == 2, 15, what="the upstream saw both streams end")
    wait_for(lambda: cluster.status()["models"][0]["in_flight"] == 0, 5, what="slots freed")
    assert metric(cluster, 'modelfleet_gateway_client_timeouts_total{phase="send"}') == 2
    for s in stalled:
        assert closed_within(s, 10) is not None, "the gateway closed the stalled connection"
        s.close()


def test_requests_that_never_finish_arriving_are_cut(cluster: Cluster) -> None:
    cluster.controller()
    url_a = cluster.upstream("a")
    cluster.start_worker().declare("w1/a", "m", url_a)
    cluster.gateway("--client-header-timeout-s", "1", "--client-body-timeout-s", "1")
    cluster.wait_routable("m", 1)
    g = cluster.gateway_url
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    silent = connect(g)  # connects, sends nothing
    partial = connect(g)  # starts its headers and trickles a byte now and then (slowloris)
    partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
    short_body = connect(g)  # complete headers, a body that stops
    short_body.sendall(request_bytes(body, content_length=10_000)[:-20])
    t0 = time.monotonic()
    for i in range(6):
        time.sleep(0.3)
        try:
            partial.sendall(b"X-Slow-%d: 1\r\n" % i)
        except OSError:
            break  # already cut
    for s, what in ((silent, "silent"), (partial, "slow headers"), (short_body, "stalled body")):
        took = closed_within(s, 5)
        assert took is not None, f"{what} connection still open"
        s.close()
    assert time.monotonic() - t0 < 4  # cut after ~1 s each, not left open

    # A body that keeps arriving, slowly but steadily, is read to its end: the body bound is
    # on silence, not on the total time.
    s = connect(g)
    head, sep, data = request_bytes(body).partition(b"\r\n\r\n")
    s.sendall(head + sep)
    step = len(data) // 4 + 1
    for i in range(0, len(data), step):
        time.sleep(0.6)  # 4 pieces: longer than the body timeout in all
        s.sendall(data[i : i + step])
    # A kept-alive connection idle between requests longer than the header timeout is fine too
    # (uvicorn's keep-alive timeout covers that time).
    s.settimeout(10)
    first = read_response(s)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    time.sleep(1.5)
    s.sendall(request_bytes(body))
    assert read_response(s).startswith(b"HTTP/1.1 200")
    s.close()
    assert metric(cluster, 'modelfleet_gateway_client_timeouts_total{phase="headers"}') == 2
    assert metric(cluster, 'modelfleet_gateway_client_timeouts_total{phase="body"}') == 1
