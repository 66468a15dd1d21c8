"""Backend ``llama-cpp-python``: llama-cpp-python's own OpenAI server on a GGUF file, started
through llama_cpp_server.py (the same server and flags; its request lines carry the request id).

The ``llama.cpp`` backend runs llama.cpp's own server (backend_llama_server.py), which
serves many requests at once. This one stays for machines without that binary (no C++
toolchain to build it, a platform we build no binary for): it needs only the
llama-cpp-python wheel. It serves one request at a time.

    python -m modelfleet.worker.runners.llama_cpp_server --model PATH --model_alias NAME --host H --port P \
        --n_ctx 2048 --n_threads N --n_gpu_layers 0 --interrupt_requests false

Flag names are the fields of llama_cpp/server/settings.py (0.3.36): the server builds its
argparse options from them, one ``--field`` each, booleans as ``true``/``false``.

Concurrency in that server version: one request at a time. Every completion, chat and
even ``GET /v1/models`` takes one global lock (``llama_outer_lock``/``llama_inner_lock``
in app.py); there is no slot or parallel-sequence setting. Worse, by default
(``interrupt_requests=true``) a request that arrives while a stream runs *ends that
stream early* with ``[DONE]``. So we always pass ``--interrupt_requests false``: further
requests queue inside the runner and each stream runs to its end. ``parallel`` /
``n_parallel`` > 1 is refused with a clear error: serve more load with more replicas.
Liveness is probed on ``/openapi.json``, which does not take that lock, so a long
generation never looks like a hung runner.
"""

from __future__ import annotations

import json
import os
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
    python_module_argv,
    require_package,
    resolve_local_source,
)

NAME = "llama-cpp-python"

# ModelSettings and ServerSettings fields of llama-cpp-python 0.3.36 that a deployment may
# set through params. model, model_alias, host, port and config_file are ours to set.
LLAMA_SERVER_FIELDS = frozenset(
    {
        # model
        "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap", "use_mlock",
        "kv_overrides", "rpc_servers",
        # context
        "seed", "n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "rope_scaling_type",
        "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast",
        "yarn_beta_slow", "yarn_orig_ctx", "mul_mat_q", "logits_all", "embedding", "offload_kqv", "flash_attn",
        "last_n_tokens_size", "lora_base", "lora_path", "numa", "chat_format", "chat_template_kwargs",
        "clip_model_path", "cache", "cache_type", "cache_size", "hf_tokenizer_config_path",
        "hf_pretrained_model_name_or_path", "hf_model_repo_id", "draft_model", "draft_model_num_pred_tokens",
        "type_k", "type_v", "verbose",
        # server
        "api_key", "interrupt_requests", "disable_ping_events", "root_path", "ssl_keyfile", "ssl_certfile",
    }
)

DEFAULT_N_CTX = 2048


def default_threads() -> int:
    # The server's own default is cpu_count // 2, which leaves half a small machine idle.
    return max(1, os.cpu_count() or 1)


def _flag_values(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, list):
        return [str(v) for v in value]  # argparse nargs="*"
    return [str(value)]


def launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    require_package("llama_cpp", NAME, "llama-cpp-python (pip install 'modelfleet[runners]')")
    model_path = resolve_local_source(spec, want="file")
    params = dict(spec.params)
    parallel = parallel_param(params, NAME)
    if parallel is not None and parallel > 1:
        raise LaunchError(
            f"backend {NAME}: parallel={parallel} is not available: llama-cpp-python's server serves one "
            "request at a time (one global lock); run more replicas instead"
        )
    unknown = sorted(k for k in params if k not in LLAMA_SERVER_FIELDS and k not in COMMON_PARAMS
                     and k not in ("parallel", "n_parallel"))
    if unknown:
        raise LaunchError(f"backend {NAME}: unknown parameter(s) {', '.join(unknown)} "
                          "(see llama_cpp/server/settings.py for the accepted ones)")
    threads = as_int(params, "n_threads", NAME) or default_threads()
    settings: dict[str, Any] = {
        "n_ctx": as_int(params, "n_ctx", NAME) or DEFAULT_N_CTX,
        "n_threads": threads,
        # The server's default is every core, whatever n_threads says: a runner limited to
        # n_threads would still take the whole machine while it reads a prompt.
        "n_threads_batch": as_int(params, "n_threads_batch", NAME) or threads,
        "n_gpu_layers": as_int(params, "n_gpu_layers", NAME) or 0,
        "interrupt_requests": False,
    }
    for key, value in params.items():
        if key in LLAMA_SERVER_FIELDS and key not in settings and value is not None:
            settings[key] = value
    if params.get("interrupt_requests") is not None:
        settings["interrupt_requests"] = params["interrupt_requests"]  # an explicit choice wins
    argv = [*python_module_argv("modelfleet.worker.runners.llama_cpp_server"),
            "--model", str(model_path), "--model_alias", spec.model, "--host", host, "--port", str(port)]
    for key, value in settings.items():
        argv += [f"--{key}", *_flag_values(value)]
    argv += extra_args(spec)
    fields = common_launch_fields(spec, model_path)
    return Launch(argv=argv, ready_path="/v1/models", live_path="/openapi.json", **fields)
