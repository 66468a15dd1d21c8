"""Backend ``sentence-transformers``: our embeddings runner (embeddings_server.py) on a
local sentence-transformers folder (or the bundled all-minilm-l6-v2).

Params: ``n_threads`` (torch threads), ``batch_size``, ``device`` (cpu, cuda, cuda:1…).
"""

from __future__ import annotations

from modelfleet.models import InstanceSpec
from modelfleet.worker.runners.base import (
    Launch,
    as_int,
    check_params,
    common_launch_fields,
    extra_args,
    python_module_argv,
    require_package,
    resolve_local_source,
)

NAME = "sentence-transformers"
KNOWN_PARAMS = frozenset({"n_threads", "batch_size", "device"})


def launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    require_package("sentence_transformers", NAME, "sentence-transformers (pip install 'modelfleet[runners]')")
    model_path = resolve_local_source(spec, want="dir")
    params = spec.params
    check_params(params, KNOWN_PARAMS, NAME)
    argv = [*python_module_argv("modelfleet.worker.runners.embeddings_server"),
            "--model-path", str(model_path), "--model-name", spec.model, "--host", host, "--port", str(port)]
    threads = as_int(params, "n_threads", NAME)
    if threads:
        argv += ["--threads", str(threads)]
    batch = as_int(params, "batch_size", NAME)
    if batch:
        argv += ["--batch-size", str(batch)]
    if params.get("device"):
        argv += ["--device", str(params["device"])]
    argv += extra_args(spec)
    fields = common_launch_fields(spec, model_path)
    if threads:
        fields["env"]["OMP_NUM_THREADS"] = str(threads)
    return Launch(argv=argv, ready_path="/health", live_path="/health", **fields)
