"""Machine resources: nvidia-smi parsing (pure) and what collect_resources subtracts."""

from __future__ import annotations

from modelfleet.models import GPU
from modelfleet.worker import resources
from modelfleet.worker.resources import MIB, collect_resources, parse_nvidia_smi

SMI = """0, NVIDIA H100 80GB HBM3, 81559, 80893
1, NVIDIA GeForce RTX 4090, 24564, 1200

2, Some GPU, with a comma, 1000, 500
3, Hidden GPU, [N/A], [N/A]
"""


def test_parse_nvidia_smi() -> None:
    gpus = parse_nvidia_smi(SMI)
    assert gpus == [
        GPU(index=0, name="NVIDIA H100 80GB HBM3", memory_total=81559 * MIB, memory_free=80893 * MIB),
        GPU(index=1, name="NVIDIA GeForce RTX 4090", memory_total=24564 * MIB, memory_free=1200 * MIB),
        GPU(index=2, name="Some GPU, with a comma", memory_total=1000 * MIB, memory_free=500 * MIB),
    ]
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == []


def test_collect_resources_subtracts_what_runners_hold(monkeypatch) -> None:
    gpus = [GPU(index=0, name="g", memory_total=1000 * MIB, memory_free=900 * MIB)]
    monkeypatch.setattr(resources, "_gpu_cache", None)
    monkeypatch.setattr(resources, "_gpus_from_nvml", lambda: None)
    monkeypatch.setattr(resources, "_gpus_from_nvidia_smi", lambda: gpus)
    free = collect_resources()
    assert free.cpu_cores >= 1 and free.memory_total > 0 and 0 < free.memory_free <= free.memory_total
    assert free.gpus[0].memory_free == 900 * MIB
    held = collect_resources({"memory": free.memory_total, "gpu_memory": {0: 400 * MIB}})
    assert held.memory_free == 0  # everything declared held
    assert held.gpus[0].memory_free == 600 * MIB  # total - declared, below what the driver reports
    small = collect_resources({"memory": 0, "gpu_memory": {0: 10 * MIB}})
    assert small.gpus[0].memory_free == 900 * MIB  # already counted in the driver's free memory


def test_no_gpu_here_means_an_empty_list(monkeypatch) -> None:
    monkeypatch.setattr(resources, "_gpu_cache", None)
    monkeypatch.setattr(resources.shutil, "which", lambda name: None)
    monkeypatch.setattr(resources, "_gpus_from_nvml", lambda: None)
    assert collect_resources().gpus == []
