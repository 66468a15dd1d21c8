"""Placement: a pure function from (replica need, worker profiles) to a worker or a reason.

Capacity is computed from each worker's *totals* minus the needs of the instances the store
has assigned to it, never from its "free" numbers, which already subtract what its running
instances hold: that way nothing is counted twice while an instance is starting, running or
coming back with a worker that was thought dead.

Remote sources (hf://, modelscope://, https://): among the workers that fit, a worker that
holds the source in its model cache (``resources.cached_models``) comes first after the
policy's own spreading, so a replacement replica starts from the cache instead of a fresh
download; a worker that does not hold it must have the disk space to download it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modelfleet.bundled import BUNDLED, BundledModelMissing
from modelfleet.models import Deployment, Instance, Placement, WorkerRecord
from modelfleet.sources import canonical_source, is_remote

GiB = 1 << 30
MiB = 1 << 20
# RAM for a CPU runner: the weights plus working memory (context, activations, Python).
MEMORY_FACTOR = 1.3
MEMORY_OVERHEAD = 512 * MiB
# VRAM for a GPU runner: weights plus KV cache and CUDA context.
GPU_MEMORY_FACTOR = 1.2
GPU_MEMORY_OVERHEAD = 1 * GiB
DEFAULT_MODEL_BYTES = 2 * GiB  # when the controller cannot see the model's files


@dataclass(frozen=True)
class Need:
    memory: int = 0  # bytes of RAM
    cpu: float = 0.0
    gpus: int = 0
    gpu_memory: int = 0  # bytes per GPU
    model: str | None = None  # canonical remote source: placement prefers workers that hold it
    download: int = 0  # bytes to download where it is not held


@dataclass
class Capacity:
    """What a worker has left for new replicas."""

    worker_id: str
    labels: dict[str, str]
    memory: int
    cpu: float
    gpu_memory: dict[int, int] = field(default_factory=dict)  # gpu index -> bytes left
    replicas_of: dict[str, int] = field(default_factory=dict)  # deployment -> replicas here
    cached: frozenset[str] = frozenset()  # remote sources in its model cache
    disk_free: int | None = None  # bytes free for the model cache; None = not reported

    def holds(self, need: Need) -> bool:
        return need.model is not None and need.model in self.cached


@dataclass(frozen=True)
class Placed:
    worker_id: str
    gpu_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Unplaced:
    reason: str


def model_bytes(backend: str, source: str) -> int:
    """Size of the model's files, as far as the controller can see them."""
    if backend == "openai":
        return 0
    path: Path | None = None
    if source in BUNDLED:
        try:
            path = BUNDLED[source].path()
        except BundledModelMissing:
            path = None
    elif source and source.startswith("/"):
        path = Path(source)
    try:
        if path is None or not path.exists():
            return DEFAULT_MODEL_BYTES
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except (OSError, ValueError):  # unreadable, a name too long, a NUL byte: the controller cannot see it
        return DEFAULT_MODEL_BYTES


def replica_need(backend: str, source: str, placement: Placement, remote_bytes: int = 0) -> Need:
    """Declared needs win; otherwise estimate from the model's size (for a remote source,
    ``remote_bytes`` as the hub or catalog told the controller, else the default)."""
    if backend == "openai":  # an attached server uses nothing on the worker
        return Need()
    remote = is_remote(source)
    size = (remote_bytes or DEFAULT_MODEL_BYTES) if remote else model_bytes(backend, source)
    model = canonical_source(source) if remote else None
    download = remote_bytes if remote else 0  # unknown size: no disk check
    if placement.gpus > 0:
        gpu_mem = placement.gpu_memory or int(size * GPU_MEMORY_FACTOR + GPU_MEMORY_OVERHEAD)
        return Need(memory=placement.memory or MEMORY_OVERHEAD, cpu=placement.cpu, gpus=placement.gpus,
                    gpu_memory=gpu_mem, model=model, download=download)
    return Need(memory=placement.memory or int(size * MEMORY_FACTOR + MEMORY_OVERHEAD), cpu=placement.cpu,
                model=model, download=download)


def capacities(
    workers: list[WorkerRecord], alive: set[str], instances: list[Instance], needs: dict[str, Need]
) -> list[Capacity]:
    """Capacity of each alive worker: totals minus needs of instances assigned to it.

    ``needs`` maps instance id -> Need (callers compute it once per deployment)."""
    out: list[Capacity] = []
    for w in workers:
        if w.id not in alive:
            continue
        cap = Capacity(
            worker_id=w.id, labels=dict(w.labels), memory=w.resources.memory_total, cpu=float(w.resources.cpu_cores),
            gpu_memory={g.index: g.memory_total for g in w.resources.gpus},
            cached=frozenset(w.resources.cached_models), disk_free=w.resources.disk_free,
        )
        for inst in instances:
            if inst.worker_id != w.id:
                continue
            if inst.deployment:
                cap.replicas_of[inst.deployment] = cap.replicas_of.get(inst.deployment, 0) + 1
            n = needs.get(inst.id)
            if n is None:
                continue
            cap.memory -= n.memory
            cap.cpu -= n.cpu
            chosen = inst.params.get("gpus")  # indexes the reconciler chose (see reconciler.GPU_PARAM)
            gpu_ids = [int(i) for i in chosen] if isinstance(chosen, list) else []
            for gi in gpu_ids:
                if gi in cap.gpu_memory:
                    cap.gpu_memory[gi] -= n.gpu_memory
        out.append(cap)
    return out


def fitting_gpus(cap: Capacity, need: Need) -> tuple[int, ...] | None:
    """The GPUs with the most memory left, if ``need.gpus`` of them each have ``need.gpu_memory``."""
    ok = sorted((gi for gi, left in cap.gpu_memory.items() if left >= need.gpu_memory),
                key=lambda gi: -cap.gpu_memory[gi])
    return tuple(sorted(ok[: need.gpus])) if len(ok) >= need.gpus else None


def why_not(cap: Capacity, need: Need, labels: dict[str, str]) -> str | None:
    """None if the replica fits on this worker, else a short reason."""
    missing = [f"{k}={v}" for k, v in labels.items() if cap.labels.get(k) != v]
    if missing:
        return f"labels {','.join(missing)} not matched"
    if need.gpus > len(cap.gpu_memory):
        return f"needs {need.gpus} GPU(s), has {len(cap.gpu_memory)}"
    if need.gpus and fitting_gpus(cap, need) is None:
        best = max(cap.gpu_memory.values(), default=0)
        return f"needs {need.gpus} GPU(s) with {need.gpu_memory / GiB:.1f} GiB free, best has {best / GiB:.1f} GiB"
    if need.memory > cap.memory:
        return f"needs {need.memory / GiB:.1f} GiB RAM, {max(cap.memory, 0) / GiB:.1f} GiB left"
    if need.cpu > cap.cpu:
        return f"needs {need.cpu:g} CPU, {max(cap.cpu, 0):g} left"
    if need.download and not cap.holds(need) and cap.disk_free is not None and need.download > cap.disk_free:
        return (f"needs {need.download / GiB:.1f} GiB of disk to download {need.model}, "
                f"{cap.disk_free / GiB:.1f} GiB free")
    return None


def place_replica(deployment: str, need: Need, placement: Placement, caps: list[Capacity]) -> Placed | Unplaced:
    """Choose a worker for one replica.

    spread (default): fewest replicas of this deployment first, then most memory left, so
    replicas land on different machines. binpack: most replicas of it / least room left
    first, filling one machine before the next. Right after the policy's replica count, a
    worker that holds the model in its cache wins over one that would download it. Ties
    break on worker id, so the result is deterministic."""
    if not caps:
        return Unplaced("no alive worker")
    fits: list[Capacity] = []
    reasons: dict[str, list[str]] = {}
    for cap in caps:
        reason = why_not(cap, need, placement.labels)
        if reason is None:
            fits.append(cap)
        else:
            reasons.setdefault(reason, []).append(cap.worker_id)
    if not fits:
        parts = [f"{', '.join(sorted(ids)[:3])}{'…' if len(ids) > 3 else ''}: {r}" for r, ids in reasons.items()]
        return Unplaced("fits no worker (" + "; ".join(sorted(parts)) + ")")

    def room(c: Capacity) -> float:
        return (sum(c.gpu_memory.values()) if need.gpus else c.memory) / GiB

    if placement.policy == "binpack":
        best = min(fits, key=lambda c: (-c.replicas_of.get(deployment, 0), not c.holds(need), room(c), c.worker_id))
    else:
        best = min(fits, key=lambda c: (c.replicas_of.get(deployment, 0), not c.holds(need), -room(c), c.worker_id))
    gpus = fitting_gpus(best, need) if need.gpus else ()
    return Placed(best.worker_id, gpus or ())


def commit(cap: Capacity, deployment: str, need: Need, gpus: tuple[int, ...]) -> None:
    """Account a placement in the capacity table, so the next replica of the same pass sees it."""
    cap.memory -= need.memory
    cap.cpu -= need.cpu
    for gi in gpus:
        cap.gpu_memory[gi] -= need.gpu_memory
    cap.replicas_of[deployment] = cap.replicas_of.get(deployment, 0) + 1


def deployment_need(d: Deployment) -> Need:
    return replica_need(d.backend, d.source, d.placement, d.model_bytes)
