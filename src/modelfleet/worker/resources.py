"""What this machine offers: CPU cores, memory and GPUs, less what our runners hold.

GPUs come from NVML when its Python binding (``pynvml``, from nvidia-ml-py) is installed,
otherwise from ``nvidia-smi --query-gpu=… --format=csv,noheader,nounits`` when that binary
exists, otherwise there are none. The agent calls this every heartbeat, so the GPU query
is cached for a few seconds: a subprocess every beat would stall the agent's loop.

Free amounts are ``min(reported free, total - declared held)``: a runner that has loaded
its model is already missing from the reported free memory, one that is still loading
is not yet, and this counts each once either way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Any

import psutil

from modelfleet.models import GPU, Resources

MIB = 1024 * 1024
GPU_CACHE_SECONDS = 5.0
NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]

_cache_lock = threading.Lock()
_gpu_cache: tuple[float, list[GPU]] | None = None


def parse_nvidia_smi(output: str) -> list[GPU]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,memory.free
    --format=csv,noheader,nounits`` (memory in MiB). Lines that do not parse are skipped
    (for example "[N/A]" on GPUs that hide their memory)."""
    gpus: list[GPU] = []
    for line in output.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        # A GPU name may contain commas: index first, the two numbers last, the name between.
        index_s, total_s, free_s = parts[0], parts[-2], parts[-1]
        name = ", ".join(parts[1:-2])
        try:
            gpus.append(GPU(index=int(index_s), name=name, memory_total=int(float(total_s) * MIB),
                            memory_free=int(float(free_s) * MIB)))
        except ValueError:
            continue
    return gpus


def _gpus_from_nvml() -> list[GPU] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GPU(index=i, name=name.decode() if isinstance(name, bytes) else str(name),
                            memory_total=int(mem.total), memory_free=int(mem.free)))
        return gpus
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpus_from_nvidia_smi() -> list[GPU]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out.stdout)


def detect_gpus(max_age: float = GPU_CACHE_SECONDS) -> list[GPU]:
    """The machine's GPUs as reported (NVML, else nvidia-smi, else none), cached ``max_age`` s."""
    global _gpu_cache
    with _cache_lock:
        now = time.monotonic()
        if _gpu_cache is not None and now - _gpu_cache[0] < max_age:
            return [g.model_copy() for g in _gpu_cache[1]]
        gpus = _gpus_from_nvml()
        if gpus is None:
            gpus = _gpus_from_nvidia_smi()
        _gpu_cache = (now, gpus)
        return [g.model_copy() for g in gpus]


def collect_resources(held: dict[str, Any] | None = None) -> Resources:
    """This machine's resources for the heartbeat, less ``held`` (Supervisor.held_resources():
    ``{"memory": bytes, "gpu_memory": {index: bytes}}``)."""
    held = held or {}
    held_memory = int(held.get("memory") or 0)
    held_gpu = {int(k): int(v) for k, v in (held.get("gpu_memory") or {}).items()}
    vm = psutil.virtual_memory()
    gpus = detect_gpus()
    for g in gpus:
        if g.index in held_gpu:
            g.memory_free = max(0, min(g.memory_free, g.memory_total - held_gpu[g.index]))
    return Resources(
        # Cores this process may use (cgroups and affinity), not all the host has.
        cpu_cores=len(os.sched_getaffinity(0)) or psutil.cpu_count(logical=True) or 1,
        memory_total=int(vm.total),
        memory_free=max(0, min(int(vm.available), int(vm.total) - held_memory)),
        gpus=gpus,
    )
