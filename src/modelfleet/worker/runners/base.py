"""What every backend shares: the Launch a backend produces, and the checks before a start.

A backend turns an InstanceSpec plus a free port into a Launch: either a command line
for a runner process (an OpenAI-compatible HTTP server, DESIGN principle 6) or, for
``openai``, the URL of a server that already runs. Backends do no I/O beyond looking at
the disk and at installed packages: the Supervisor owns processes, ports and health.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.bundled import BUNDLED, BundledModelMissing
from modelfleet.models import InstanceSpec

# Parameters the Supervisor reads itself (resources, placement, escape hatches); no
# backend passes them on to its server as flags.
COMMON_PARAMS = frozenset({"memory", "gpu_memory", "gpus", "cpu", "args", "env"})


class LaunchError(Exception):
    """A problem no restart can fix (unknown backend, missing package or model file, bad
    parameter): the instance fails with exactly this message and is not restarted."""


@dataclass
class Launch:
    """How to run (or reach) one instance."""

    argv: list[str] | None = None  # runner command; None for an attached URL
    env: dict[str, str] = field(default_factory=dict)  # added to the worker's environment
    url: str | None = None  # attached server's base URL (no /v1), for backend openai
    # Readiness: the first 200 on this path after start. Liveness while ready: this path.
    # They differ for llama.cpp, whose /v1/models waits behind the generation lock.
    ready_path: str = "/v1/models"
    live_path: str = "/health"
    # Declared needs, held while the runner lives (see Supervisor.held_resources).
    memory: int = 0
    gpu_memory: int = 0
    gpus: list[int] = field(default_factory=list)
    # llama-server's slot count; > 0: the worker scrapes its /metrics and /slots (slots.py).
    slots: int = 0


def offline_env() -> dict[str, str]:
    """DESIGN principle 9: nothing downloads at run time, in any runner."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # load progress reaches the log as it happens
        "TOKENIZERS_PARALLELISM": "false",
    }


def check_params(params: dict[str, Any], known: frozenset[str], backend: str, hint: str = "") -> None:
    """Refuse unknown parameters with the list of known ones: a typo must not pass silently."""
    unknown = sorted(set(params) - known - COMMON_PARAMS)
    if unknown:
        raise LaunchError(f"backend {backend}: unknown parameter(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))}{hint})")


def require_package(module: str, backend: str, hint: str) -> None:
    """Fail before spawning when the backend's package is not installed in this venv."""
    if importlib.util.find_spec(module) is None:
        raise LaunchError(f"backend {backend} needs {hint}")


def resolve_local_source(spec: InstanceSpec, *, want: str) -> Path:
    """The model path for a local backend: a bundled name, or a path that must exist.

    ``want`` is "file" or "dir": a GGUF is one file, a Hugging Face model is a folder.
    """
    source = spec.source or spec.model
    bundled = BUNDLED.get(source)
    if bundled is not None:
        try:
            return bundled.path()
        except BundledModelMissing as exc:
            raise LaunchError(str(exc)) from None
    if not spec.source:
        raise LaunchError(f"instance {spec.id}: no model source given for backend {spec.backend}")
    path = Path(os.path.expanduser(spec.source))
    if not path.exists():
        raise LaunchError(f"model path does not exist: {path}")
    if want == "file" and not path.is_file():
        raise LaunchError(f"model path is not a file: {path} (backend {spec.backend} needs a model file)")
    if want == "dir" and not path.is_dir():
        raise LaunchError(f"model path is not a folder: {path} (backend {spec.backend} needs a model folder)")
    return path


def disk_size(path: Path) -> int:
    """Bytes on disk of a model file or folder: the memory estimate when none is declared."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def python_module_argv(module: str) -> list[str]:
    """Runners run with the worker's own interpreter, so they see the same venv."""
    return [sys.executable, "-m", module]


def as_int(params: dict[str, Any], key: str, backend: str) -> int | None:
    if key not in params or params[key] is None:
        return None
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LaunchError(f"backend {backend}: parameter {key} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"backend {backend}: parameter {key} must be an integer, got {value!r}") from None


def parallel_param(params: dict[str, Any], backend: str) -> int | None:
    """``parallel`` and ``n_parallel`` are synonyms (deployments use either)."""
    a, b = as_int(params, "n_parallel", backend), as_int(params, "parallel", backend)
    if a is not None and b is not None and a != b:
        raise LaunchError(f"backend {backend}: parameters parallel={b} and n_parallel={a} disagree")
    value = a if a is not None else b
    if value is not None and value < 1:
        raise LaunchError(f"backend {backend}: parallel must be at least 1, got {value}")
    return value


def common_launch_fields(spec: InstanceSpec, model_path: Path | None) -> dict[str, Any]:
    """Declared resources, GPU pinning and extra environment, shared by all process backends."""
    params = spec.params
    env: dict[str, str] = offline_env()
    extra_env = params.get("env") or {}
    if not isinstance(extra_env, dict):
        raise LaunchError(f"backend {spec.backend}: parameter env must be an object of strings")
    env.update({str(k): str(v) for k, v in extra_env.items()})
    gpus_param = params.get("gpus")
    gpus: list[int] = []
    if gpus_param is not None:
        if isinstance(gpus_param, int) and not isinstance(gpus_param, bool):
            gpus = list(range(gpus_param))
        elif isinstance(gpus_param, list) and all(isinstance(g, int) for g in gpus_param):
            gpus = list(gpus_param)
        else:
            raise LaunchError(f"backend {spec.backend}: parameter gpus must be a count or a list of GPU indexes")
        # Pin the runner to its GPUs, so two runners on one machine do not share one by accident.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    memory = as_int(params, "memory", spec.backend)
    gpu_memory = as_int(params, "gpu_memory", spec.backend) or 0
    if memory is None:
        # Undeclared: the weights' size on disk is the best cheap estimate of resident memory.
        memory = disk_size(model_path) if model_path is not None else 0
    return {"env": env, "memory": memory, "gpu_memory": gpu_memory, "gpus": gpus}


def extra_args(spec: InstanceSpec) -> list[str]:
    """``params.args``: extra command-line arguments appended verbatim (an escape hatch)."""
    args = spec.params.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise LaunchError(f"backend {spec.backend}: parameter args must be a list of strings")
    return [str(a) for a in args]
