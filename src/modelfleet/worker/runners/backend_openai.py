"""Backend ``openai``: attach an OpenAI-compatible server that runs elsewhere (vLLM,
Ollama, llama.cpp's server, TGI, another modelfleet runner): no process, only health.

SOURCE is the server's URL, with or without a trailing ``/v1``. The instance's endpoint
is the URL without ``/v1``, like every runner's endpoint, so the gateway appends
``/v1/chat/completions`` alike to all. Health: ``GET {endpoint}/v1/models``.
"""

from __future__ import annotations

import re

from modelfleet.models import InstanceSpec
from modelfleet.worker.runners.base import Launch, LaunchError

NAME = "openai"


def base_url(source: str) -> str:
    url = source.strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise LaunchError(f"backend openai needs an http(s) URL as source, got {source!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def launch(spec: InstanceSpec, host: str, port: int | None) -> Launch:
    return Launch(url=base_url(spec.source), ready_path="/v1/models", live_path="/v1/models")
