"""The gateway's upstream pool against an instance that closes a keep-alive connection when
it is reused, before answering (llama-server does so after every streamed answer although it
said keep-alive): the request goes once more on a new connection and succeeds, with no error
to count against the instance. A real socket server, scripted to close that way."""

from __future__ import annotations

import asyncio

import pytest

from modelfleet.gateway.upstream import UpstreamError, UpstreamPool

ANSWER = (
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)


async def read_request(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return True


@pytest.fixture
async def closes_on_reuse():
    """Answers the first request of each connection; closes the connection, unanswered, on
    the second one. Counts the requests it answered."""
    answered: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(ANSWER)
            await writer.drain()
            answered.append(1)
            await reader.readuntil(b"\r\n\r\n")  # the reuse: close without a byte of answer
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", answered
    server.close()
    await server.wait_closed()


async def test_reused_connection_closed_by_the_instance_is_retried_on_a_new_one(closes_on_reuse) -> None:
    url, answered = closes_on_reuse
    pool = UpstreamPool(2.0, 5.0, 5.0)
    try:
        for _ in range(3):
            conn = await pool.post(url, "/v1/chat/completions", b"{}")
            assert conn.status == 200 and await conn.read_all(5.0) == b"hello"
            conn.release()  # keep-alive: back to the pool, and reused by the next post
        assert len(answered) == 3
    finally:
        pool.close()


async def test_a_new_connection_that_closes_unanswered_is_still_an_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(2.0, 5.0, 5.0)
    try:
        with pytest.raises(UpstreamError) as err:
            await pool.post(f"http://127.0.0.1:{port}", "/v1/chat/completions", b"{}")
        assert err.value.before_response
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
