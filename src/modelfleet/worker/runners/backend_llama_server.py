"""Backend ``llama.cpp``: llama.cpp's own server (``llama-server``) on a GGUF file.

    llama-server --model PATH --alias NAME --host H --port P --parallel N \
        --ctx-size N*PER_SLOT --cont-batching --metrics --slots --cache-reuse 256 \
        --threads T --threads-batch T --n-gpu-layers 0 --no-webui

``--parallel`` slots decode together (continuous batching): N requests share each forward
pass, so a replica serves N streams at about the cost of one. N is the instance's
max_concurrency (what the gateway admits to it) unless ``parallel`` is set. The context is
per slot: ``n_ctx`` (default 2048) is what one request may use, and the server gets
``n_ctx × N`` in all (llama-server splits ``--ctx-size`` evenly over its slots). Prompt
caching is on by default in llama-server: each slot keeps its last prompt's KV, a request
takes the idle slot whose prompt shares the most of its own, and when a slot is reused its
prompt state is saved to a RAM cache (``cache_ram`` MiB, llama-server's default 8192) from
which a later request restores the longest match; ``--cache-reuse`` also reuses shifted
chunks. ``--metrics`` and ``--slots`` turn on
the endpoints the worker scrapes (slots.py).

The binary is built once from the llama.cpp tree that the llama-cpp-python sdist vendors
(scripts/build_llama_server.sh) and found by ``find_binary``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from modelfleet.models import InstanceSpec
from modelfleet.worker.runners.base import (
    COMMON_PARAMS,
    Launch,
    LaunchError,
    as_int,
    common_launch_fields,
    extra_args,
    parallel_param,
    resolve_local_source,
)

NAME = "llama.cpp"
LLAMA_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp we build
BINARY_ENV = "MODELFLEET_LLAMA_SERVER"
CACHE_ENV = "MODELFLEET_LLAMA_SERVER_CACHE"
DEFAULT_N_CTX = 2048  # per slot
CACHE_REUSE = 256  # smallest chunk reused by KV shifting (llama.cpp's own presets use 256)

# params -> llama-server flag. A value of True for a boolean flag passes the flag alone.
FLAGS: dict[str, str] = {
    "n_batch": "--batch-size",
    "n_ubatch": "--ubatch-size",
    "flash_attn": "--flash-attn",
    "seed": "--seed",
    "chat_template": "--chat-template",
    "type_k": "--cache-type-k",
    "type_v": "--cache-type-v",
    "cache_reuse": "--cache-reuse",
    # MiB of host memory for prompt states saved from slots (llama-server's default: 8192):
    # a prompt whose slot was reused is restored from there instead of evaluated again.
    "cache_ram": "--cache-ram",
    "slot_prompt_similarity": "--slot-prompt-similarity",
    "rope_freq_base": "--rope-freq-base",
    "rope_freq_scale": "--rope-freq-scale",
    "api_key": "--api-key",
    "main_gpu": "--main-gpu",
    "split_mode": "--split-mode",
    "tensor_split": "--tensor-split",
    "threads_http": "--threads-http",
}
BOOL_FLAGS: dict[str, tuple[str, str | None]] = {
    # param: (flag when true, flag when false)
    "embedding": ("--embeddings", None),
    "embeddings": ("--embeddings", None),
    "jinja": ("--jinja", "--no-jinja"),
    "cont_batching": ("--cont-batching", "--no-cont-batching"),
    "cache_prompt": ("", "--no-cache-prompt"),
}
KNOWN = frozenset(
    {"n_ctx", "n_threads", "n_threads_batch", "n_gpu_layers", "parallel", "n_parallel", *FLAGS, *BOOL_FLAGS}
)


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "modelfleet" / "llama-server")


def find_binary() -> Path | None:
    """Where llama-server is, in this order: $MODELFLEET_LLAMA_SERVER; next to the running
    interpreter (the container image puts it in the venv's bin/); the build cache of
    scripts/build_llama_server.sh; ``llama-server`` on PATH."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        p = Path(explicit).expanduser()
        return p if p.is_file() and os.access(p, os.X_OK) else None
    for p in (Path(sys.executable).parent / "llama-server", cache_dir() / LLAMA_VERSION / "llama-server"):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which("llama-server")
    return Path(found) if found else None


def slots_for(spec: InstanceSpec) -> int:
    """The server's slot count: ``parallel`` when set, else the instance's max_concurrency."""
    return parallel_param(spec.params, NAME) or max(1, spec.max_concurrency)


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "True", "1", 1):
        return True
    if value in ("false", "False", "0", 0):
        return False
    raise LaunchError(f"backend {NAME}: parameter {key} must be true or false, got {value!r}")


def launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    params = dict(spec.params)
    unknown = sorted(set(params) - KNOWN - COMMON_PARAMS)
    if unknown:
        raise LaunchError(
            f"backend {NAME}: unknown parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(KNOWN))}; anything else goes in args)"
        )
    model_path = resolve_local_source(spec, want="file")
    binary = find_binary()
    if binary is None:
        where = os.environ.get(BINARY_ENV) or str(cache_dir() / LLAMA_VERSION / "llama-server")
        raise LaunchError(
            f"backend {NAME} needs llama.cpp's llama-server, not found at {where} nor on PATH: "
            "run scripts/build_llama_server.sh (make install does), or use backend llama-cpp-python"
        )
    slots = slots_for(spec)
    per_slot = as_int(params, "n_ctx", NAME) or DEFAULT_N_CTX
    if per_slot < 16:
        raise LaunchError(f"backend {NAME}: n_ctx (context per slot) must be at least 16, got {per_slot}")
    threads = as_int(params, "n_threads", NAME) or default_threads()
    argv = [
        str(binary),
        "--model",
        str(model_path),
        "--alias",
        spec.model,
        "--host",
        host,
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(per_slot * slots),
        "--threads",
        str(threads),
        # The server's default batch threads is every core: a runner limited to 2 threads
        # would still take the whole machine while it reads a prompt.
        "--threads-batch",
        str(as_int(params, "n_threads_batch", NAME) or threads),
        "--n-gpu-layers",
        str(as_int(params, "n_gpu_layers", NAME) or 0),
        "--metrics",
        "--slots",
        "--no-webui",
    ]
    if "cont_batching" not in params:
        argv.append("--cont-batching")
    if "cache_reuse" not in params:
        argv += ["--cache-reuse", str(CACHE_REUSE)]
    for key, value in params.items():
        if value is None:
            continue
        if key in FLAGS:
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "on" if value else "off"  # flash_attn takes on|off|auto
            argv += [FLAGS[key], str(value)]
        elif key in BOOL_FLAGS:
            flag = BOOL_FLAGS[key][0 if _bool(value, key) else 1]
            if flag:
                argv.append(flag)
    argv += extra_args(spec)
    fields = common_launch_fields(spec, model_path)
    # /health answers 503 while the model loads and 200 once it serves; it does not wait
    # for a free slot, so busy slots never look like a hung runner.
    return Launch(argv=argv, ready_path="/health", live_path="/health", slots=slots, **fields)
