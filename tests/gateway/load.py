"""A small asyncio load client for gateway tests: many concurrent requests, every outcome kept."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class Outcome:
    status: int = 0  # 0: no HTTP answer (exception)
    instance: str = ""
    error: str = ""  # exception text, or the SSE error event's message
    done: bool = False  # streams: saw [DONE]
    chunks: int = 0
    retry_after: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200 or o.error or (o.chunks and not o.done)]

    def by_instance(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.instance] = out.get(o.instance, 0) + 1
        return out


def chat_body(model: str = "m", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream, **extra}


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
              ) -> Outcome:
    o = Outcome()
    try:
        if not body.get("stream"):
            r = await client.post(url, json=body, headers=headers)
            o.status, o.instance = r.status_code, r.headers.get("x-modelfleet-instance", "")
            o.retry_after = r.headers.get("retry-after")
            return o
        async with client.stream("POST", url, json=body, headers=headers) as r:
            o.status, o.instance = r.status_code, r.headers.get("x-modelfleet-instance", "")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    o.done = True
                    continue
                obj = orjson.loads(data)
                if "error" in obj:
                    o.error = obj["error"]["message"]
                else:
                    o.chunks += 1
    except httpx.HTTPError as exc:
        o.error = f"{type(exc).__name__}: {exc}"
    return o


async def run_load(url: str, n: int, concurrency: int, body: dict[str, Any],
                   headers: dict[str, str] | None = None, duration_s: float | None = None,
                   stop: asyncio.Event | None = None) -> Load:
    """``n`` requests (or as many as fit in ``duration_s``, or until ``stop`` is set) with
    ``concurrency`` in flight."""
    load = Load()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    deadline = time.monotonic() + duration_s if duration_s else None
    counter = iter(range(n))
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def lane() -> None:
            for _ in counter:
                if (deadline is not None and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
                    return
                load.outcomes.append(await one(client, url, body, headers))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return load
