"""`modelfleet chat`: a terminal conversation through the gateway, streamed as generated."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import httpx


def stream_reply(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> Iterator[str]:
    """Yield content deltas of one streamed chat completion; raise RuntimeError on an error answer."""
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise RuntimeError(f"{r.status_code}: {msg}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream broke: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text


def run_chat(gateway: str, model: str, *, api_key: str | None = None, system: str | None = None,
             max_tokens: int = 256, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    url = f"{gateway.rstrip('/')}/v1/chat/completions"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"chatting with {model} at {gateway} (Ctrl-D to end)\n")
    with httpx.Client(timeout=httpx.Timeout(10.0, read=300.0)) as client:
        while True:
            if interactive:
                stdout.write("you> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            messages.append({"role": "user", "content": text})
            body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
            stdout.write(f"{model}> ")
            stdout.flush()
            reply = []
            try:
                for piece in stream_reply(client, url, body, headers):
                    reply.append(piece)
                    stdout.write(piece)
                    stdout.flush()
            except (RuntimeError, httpx.HTTPError) as exc:
                stdout.write(f"\n[error] {exc}\n")
                messages.pop()
                continue
            stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
