"""Backend ``transformers``: our transformers runner (transformers_server.py) on a local
Hugging Face causal-LM folder (config, weights, tokenizer with a chat template).

Params: ``n_threads`` (torch threads), ``parallel``/``n_parallel`` (generations at a time,
default 1), ``device`` (cpu, cuda, cuda:1…), ``dtype`` (auto, float32, bfloat16, float16).
"""

from __future__ import annotations

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
    require_package,
    resolve_local_source,
)

NAME = "transformers"
KNOWN_PARAMS = frozenset({"n_threads", "parallel", "n_parallel", "device", "dtype"})


def launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    require_package("transformers", NAME, "transformers and torch (pip install 'modelfleet[runners]')")
    require_package("torch", NAME, "transformers and torch (pip install 'modelfleet[runners]')")
    model_path = resolve_local_source(spec, want="dir")
    params = spec.params
    check_params(params, KNOWN_PARAMS, NAME)
    if not (model_path / "config.json").is_file():
        raise LaunchError(f"model folder has no config.json: {model_path} (backend {NAME} needs a Hugging Face "
                          "model folder)")
    argv = [*python_module_argv("modelfleet.worker.runners.transformers_server"),
            "--model-path", str(model_path), "--model-name", spec.model, "--host", host, "--port", str(port)]
    threads = as_int(params, "n_threads", NAME)
    if threads:
        argv += ["--threads", str(threads)]
    parallel = parallel_param(params, NAME)
    if parallel:
        argv += ["--parallel", str(parallel)]
    for key in ("device", "dtype"):
        if params.get(key):
            argv += [f"--{key}", str(params[key])]
    argv += extra_args(spec)
    fields = common_launch_fields(spec, model_path)
    if threads:
        fields["env"]["OMP_NUM_THREADS"] = str(threads)
    return Launch(argv=argv, ready_path="/health", live_path="/health", **fields)
