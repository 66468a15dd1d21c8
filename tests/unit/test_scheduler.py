"""Placement as a pure function, on tables of worker profiles (CPU boxes and GPU machines)."""

from __future__ import annotations

import pytest

from modelfleet.controller.scheduler import (
    Capacity,
    GiB,
    Need,
    Placed,
    Unplaced,
    capacities,
    commit,
    place_replica,
    replica_need,
)
from modelfleet.models import GPU, Instance, Placement, Resources, WorkerRecord


def worker(
    wid: str,
    *,
    mem_gib: float = 16,
    cpus: int = 8,
    gpus: list[float] | None = None,
    labels: dict[str, str] | None = None,
    age: float = 0.5,
) -> WorkerRecord:
    return WorkerRecord(
        id=wid,
        name=wid,
        address="10.0.0.1",
        port=8200,
        labels=labels or {},
        heartbeat_age=age,
        resources=Resources(
            cpu_cores=cpus,
            memory_total=int(mem_gib * GiB),
            memory_free=int(mem_gib * GiB),
            gpus=[
                GPU(index=i, name="H100", memory_total=int(g * GiB), memory_free=int(g * GiB))
                for i, g in enumerate(gpus or [])
            ],
        ),
    )


def caps_of(
    *workers: WorkerRecord, instances: list[Instance] | None = None, needs: dict[str, Need] | None = None
) -> list[Capacity]:
    return capacities(list(workers), {w.id for w in workers}, instances or [], needs or {})


def place_n(n: int, need: Need, placement: Placement, caps: list[Capacity]) -> list[str]:
    out = []
    by_id = {c.worker_id: c for c in caps}
    for _ in range(n):
        r = place_replica("d", need, placement, caps)
        assert isinstance(r, Placed), r
        commit(by_id[r.worker_id], "d", need, r.gpu_indexes)
        out.append(r.worker_id)
    return out


def test_spread_puts_replicas_on_different_workers():
    caps = caps_of(worker("a"), worker("b"), worker("c"))
    assert sorted(place_n(3, Need(memory=1 * GiB), Placement(), caps)) == ["a", "b", "c"]


def test_binpack_fills_one_worker_first():
    caps = caps_of(worker("a", mem_gib=8), worker("b", mem_gib=8))
    assert place_n(3, Need(memory=2 * GiB), Placement(policy="binpack"), caps) == ["a", "a", "a"]


def test_spread_prefers_more_room_when_counts_tie():
    caps = caps_of(worker("small", mem_gib=4), worker("big", mem_gib=64))
    assert place_n(1, Need(memory=1 * GiB), Placement(), caps) == ["big"]


@pytest.mark.parametrize(
    ("profiles", "need", "expect"),
    [
        # one 80 GB GPU box and one 24 GB box: a 40 GB replica only fits the big one
        ({"h100": [80], "rtx4090": [24]}, Need(gpus=1, gpu_memory=40 * GiB), "h100"),
        # two GPUs needed: only the 2x box qualifies
        ({"2xa100": [40, 40], "1xh100": [80]}, Need(gpus=2, gpu_memory=20 * GiB), "2xa100"),
        # a small replica fits both; spread picks the one with more GPU memory left
        ({"l4": [24], "h200": [141]}, Need(gpus=1, gpu_memory=8 * GiB), "h200"),
    ],
)
def test_gpu_profiles(profiles, need, expect):
    caps = caps_of(*[worker(name, gpus=g) for name, g in profiles.items()])
    r = place_replica("d", need, Placement(gpus=need.gpus), caps)
    assert isinstance(r, Placed) and r.worker_id == expect
    assert len(r.gpu_indexes) == need.gpus


def test_gpu_memory_is_consumed_per_gpu():
    caps = caps_of(worker("box", gpus=[24, 24]))
    placed = place_n(2, Need(gpus=1, gpu_memory=20 * GiB), Placement(gpus=1), caps)
    assert placed == ["box", "box"]
    r = place_replica("d", Need(gpus=1, gpu_memory=20 * GiB), Placement(gpus=1), caps)
    assert isinstance(r, Unplaced) and "GPU(s) with 20.0 GiB free" in r.reason


def test_labels_must_match_and_reason_says_which():
    caps = caps_of(worker("a", labels={"zone": "x"}), worker("b", labels={"zone": "y"}))
    r = place_replica("d", Need(), Placement(labels={"zone": "y"}), caps)
    assert isinstance(r, Placed) and r.worker_id == "b"
    r = place_replica("d", Need(), Placement(labels={"zone": "z"}), caps)
    assert isinstance(r, Unplaced) and "labels zone=z not matched" in r.reason


def test_no_gpu_worker_for_gpu_replica_gives_reason():
    r = place_replica("d", Need(gpus=1, gpu_memory=GiB), Placement(gpus=1), caps_of(worker("cpu-only")))
    assert isinstance(r, Unplaced) and "needs 1 GPU(s), has 0" in r.reason


def test_no_alive_worker():
    r = place_replica("d", Need(), Placement(), [])
    assert isinstance(r, Unplaced) and r.reason == "no alive worker"


def test_capacity_counts_assigned_instances_once():
    """Capacity is totals minus assigned needs, whatever the worker's own free figure says."""
    w = worker("a", mem_gib=10)
    w.resources.memory_free = 1 * GiB  # the runner already holds memory: must not count twice
    inst = Instance(id="i1", model="d", deployment="d", worker_id="a")
    (cap,) = caps_of(w, instances=[inst], needs={"i1": Need(memory=4 * GiB)})
    assert cap.memory == 6 * GiB and cap.replicas_of == {"d": 1}


def test_dead_workers_are_not_candidates():
    alive, dead = worker("alive"), worker("dead", age=100)
    caps = capacities([alive, dead], {"alive"}, [], {})
    assert [c.worker_id for c in caps] == ["alive"]


def test_need_estimate_from_bundled_model_size():
    need = replica_need("llama.cpp", "smollm2-135m-instruct", Placement())
    assert 0.5 * GiB < need.memory < 1 * GiB  # ~94 MB file * 1.3 + 512 MiB
    assert replica_need("openai", "http://x", Placement()) == Need()
    gpu = replica_need("vllm", "/nonexistent/model", Placement(gpus=1))
    assert gpu.gpus == 1 and gpu.gpu_memory > 2 * GiB  # default size when files are not visible
    declared = replica_need("vllm", "/x", Placement(gpus=2, gpu_memory=30 * GiB))
    assert declared.gpu_memory == 30 * GiB
