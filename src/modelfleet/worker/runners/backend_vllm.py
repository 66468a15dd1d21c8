"""Backend ``vllm``: vLLM's own OpenAI server (GPU machines; the ``vllm`` extra).

    python -m vllm.entrypoints.openai.api_server --model SRC --served-model-name NAME \
        --host H --port P [--max-model-len n_ctx] [--max-num-seqs parallel] \
        [--tensor-parallel-size tensor_parallel_size] [--gpu-memory-utilization …] [--dtype …]

SOURCE is a local folder or a Hugging Face repo id already in the local cache (runners
are offline: HF_HUB_OFFLINE=1). Other vLLM flags go through ``params.args``.

``MODELFLEET_VLLM_PYTHON``: the interpreter that has vLLM, when it is not the worker's own
(the ``vllm`` image runs the worker in a Python 3.11 venv and vLLM in the image's Python).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from modelfleet.models import InstanceSpec
from modelfleet.worker.runners.base import (
    Launch,
    LaunchError,
    as_int,
    check_params,
    common_launch_fields,
    extra_args,
    parallel_param,
    python_module_argv,
)

NAME = "vllm"
MISSING = "backend vllm needs the vllm extra (pip install 'modelfleet[vllm]')"
PYTHON_ENV = "MODELFLEET_VLLM_PYTHON"
KNOWN_PARAMS = frozenset({"n_ctx", "parallel", "n_parallel", "tensor_parallel_size", "gpu_memory_utilization",
                          "dtype", "quantization", "max_num_batched_tokens", "enforce_eager"})


def launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    python = os.environ.get(PYTHON_ENV)
    if python and not os.access(python, os.X_OK):
        raise LaunchError(f"backend vllm: {PYTHON_ENV}={python} is not an executable")
    if not python and importlib.util.find_spec("vllm") is None:
        raise LaunchError(MISSING)
    source = spec.source or spec.model
    local: Path | None = None
    if source.startswith(("/", ".", "~")):
        local = Path(source).expanduser()
        if not local.exists():
            raise LaunchError(f"model path does not exist: {local}")
    params = spec.params
    check_params(params, KNOWN_PARAMS, NAME, "; others through params.args")
    argv = [*python_module_argv("vllm.entrypoints.openai.api_server"), "--model", str(local or source),
            "--served-model-name", spec.model, "--host", host, "--port", str(port)]
    if python:
        argv[0] = python
    n_ctx = as_int(params, "n_ctx", NAME)
    if n_ctx:
        argv += ["--max-model-len", str(n_ctx)]
    parallel = parallel_param(params, NAME)
    if parallel:
        argv += ["--max-num-seqs", str(parallel)]
    tp = as_int(params, "tensor_parallel_size", NAME)
    if tp:
        argv += ["--tensor-parallel-size", str(tp)]
    for key in ("gpu_memory_utilization", "dtype", "quantization", "max_num_batched_tokens"):
        if params.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(params[key])]
    if params.get("enforce_eager"):
        argv += ["--enforce-eager"]
    argv += extra_args(spec)
    return Launch(argv=argv, ready_path="/v1/models", live_path="/health", **common_launch_fields(spec, local))
