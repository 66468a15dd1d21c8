"""Model runners: one module per backend, each turning an InstanceSpec and a free port
into a Launch (a command line for a runner process, or a URL to attach), plus our own
runner servers (embeddings_server, transformers_server).

This package stays light to import: the worker agent imports it, and the heavy
libraries (torch, llama_cpp, vllm) are only ever imported inside runner processes.
"""

from __future__ import annotations

from collections.abc import Callable

from modelfleet.models import InstanceSpec
from modelfleet.worker.runners import (
    backend_llama_cpp,
    backend_llama_server,
    backend_openai,
    backend_sentence_transformers,
    backend_transformers,
    backend_vllm,
)
from modelfleet.worker.runners.base import Launch, LaunchError

LaunchFn = Callable[[InstanceSpec, str, int], Launch]

BACKENDS: dict[str, LaunchFn] = {
    backend_llama_server.NAME: backend_llama_server.launch,
    backend_llama_cpp.NAME: backend_llama_cpp.launch,
    backend_sentence_transformers.NAME: backend_sentence_transformers.launch,
    backend_transformers.NAME: backend_transformers.launch,
    backend_vllm.NAME: backend_vllm.launch,
    backend_openai.NAME: backend_openai.launch,
}
# Backends that run no process (nothing to spawn, no port to take).
ATTACHED = {backend_openai.NAME}


def register_backend(name: str, launch: LaunchFn, *, attached: bool = False) -> None:
    """Add a backend (a plug-in, or a scripted test server): launch(spec, host, port) -> Launch."""
    BACKENDS[name] = launch
    if attached:
        ATTACHED.add(name)
    else:
        ATTACHED.discard(name)


def uses_process(backend: str) -> bool:
    return backend in BACKENDS and backend not in ATTACHED


def prepare_launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    """The Launch for one instance; LaunchError with a message fit for last_error otherwise."""
    launch = BACKENDS.get(spec.backend)
    if launch is None:
        raise LaunchError(f"unknown backend {spec.backend!r} (known: {', '.join(sorted(BACKENDS))})")
    return launch(spec, host, port)


__all__ = ["ATTACHED", "BACKENDS", "Launch", "LaunchError", "prepare_launch", "register_backend", "uses_process"]
