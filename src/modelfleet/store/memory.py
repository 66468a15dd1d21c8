"""In-process store for tests and single-process use. Its clock is this process's clock.

Every method runs without an ``await`` between read and write, so on one event loop each
call is atomic, as the contract requires. It keeps nothing across a restart (volatile by
nature): every new process is a new cluster identity."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from modelfleet.models import (
    ApiKey,
    AutoscaleStatus,
    Deployment,
    Instance,
    InstanceSpec,
    InstanceStatus,
    Lease,
    LoadReport,
    WorkerInfo,
    WorkerRecord,
)
from modelfleet.store.base import (
    AUTH_OPENED,
    AUTH_REQUIRED,
    SPEC_FIELDS,
    ClusterMeta,
    HeartbeatResult,
    Persistence,
    Store,
    StoreError,
)

STATUS_FIELDS = ("state", "endpoint", "restarts", "last_error")


class MemoryStore(Store):
    url_scheme = "memory"

    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._instances: dict[str, Instance] = {}
        self._deployments: dict[str, Deployment] = {}
        self._leases: dict[str, tuple[str, int, float]] = {}  # name -> (holder, token, expires_at)
        self._keys: dict[str, ApiKey] = {}
        self._loads: dict[str, tuple[LoadReport, float]] = {}  # source -> (report, expires_at)
        # Liveness clock at each worker's last heartbeat: store time minus time paused before it.
        self._live_at: dict[str, float] = {}
        self._paused = 0.0
        self._paused_until = 0.0
        self._meta = ClusterMeta(cluster_id=None)
        # A fresh store's revision starts at the time in ms (see base.py).
        self._revision = int(time.time() * 1000)

    async def migrate(self) -> None:
        if self._meta.cluster_id is None:
            self._meta = ClusterMeta(cluster_id=uuid.uuid4().hex)

    async def ping(self) -> None:
        return None

    async def now(self) -> float:
        return time.time()

    async def close(self) -> None:
        return None

    async def persistence(self) -> Persistence:
        return Persistence("volatile", "memory:// keeps the cluster state in this process only")

    # -- identity, auth state, outages
    async def get_cluster_meta(self) -> ClusterMeta:
        return self._meta

    async def open_inference(self) -> None:
        self._meta = replace(self._meta, auth=AUTH_OPENED)
        self._bump()

    async def record_accepted(self, replaced_cluster_id: str, auth_required: bool) -> None:
        m = self._meta
        replaces = m.replaces if replaced_cluster_id in m.replaces else (*m.replaces, replaced_cluster_id)
        self._meta = replace(m, replaces=replaces, auth=AUTH_REQUIRED if auth_required else m.auth)
        self._bump()

    async def record_outage(self) -> float:
        now = time.time()
        latest = max((w.last_heartbeat for w in self._workers.values()), default=now)
        added = max(0.0, now - max(self._paused_until, latest))
        self._paused += added
        self._paused_until = max(self._paused_until, now)
        return added

    def _live_now(self, now: float) -> float:
        return now - self._paused

    def _bump(self) -> int:
        self._revision += 1
        return self._revision

    # -- workers
    async def heartbeat(self, worker: WorkerInfo, statuses: list[InstanceStatus] | None = None) -> HeartbeatResult:
        now = time.time()
        old = self._workers.get(worker.id)
        registered = old is None
        self._workers[worker.id] = WorkerRecord(
            **worker.model_dump(), last_heartbeat=now, registered_at=old.registered_at if old else now
        )
        self._live_at[worker.id] = self._live_now(now)
        if registered:
            self._bump()
        if statuses is not None:
            reported = set()
            for st in statuses:
                reported.add(st.id)
                inst = self._instances.get(st.id)
                if inst is None and st.declared and st.model:
                    inst = Instance(
                        id=st.id,
                        model=st.model,
                        worker_id=worker.id,
                        backend=st.backend or "",
                        source=st.source or "",
                        max_concurrency=st.max_concurrency or 4,
                        updated_at=now,
                    )
                    self._instances[st.id] = inst
                if inst is None or inst.worker_id != worker.id:
                    continue
                for f in STATUS_FIELDS:
                    setattr(inst, f, getattr(st, f))
                inst.updated_at = now
            for iid, inst in list(self._instances.items()):
                if inst.worker_id == worker.id and inst.deployment is None and iid not in reported:
                    del self._instances[iid]
            self._bump()
        return HeartbeatResult(registered=registered, revision=self._revision)

    def _age(self, worker_id: str, now: float) -> float:
        return max(0.0, self._live_now(now) - self._live_at[worker_id])

    def _aged(self, w: WorkerRecord, now: float) -> WorkerRecord:
        return w.model_copy(update={"heartbeat_age": self._age(w.id, now)})

    async def list_workers(self) -> list[WorkerRecord]:
        now = time.time()
        return [self._aged(w, now) for w in sorted(self._workers.values(), key=lambda w: w.id)]

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        w = self._workers.get(worker_id)
        return self._aged(w, time.time()) if w else None

    async def delete_worker(self, worker_id: str) -> bool:
        if self._workers.pop(worker_id, None) is None:
            return False
        self._live_at.pop(worker_id, None)
        for iid, inst in list(self._instances.items()):
            if inst.worker_id == worker_id and inst.deployment is None:
                del self._instances[iid]
        self._bump()
        return True

    async def delete_dead_workers(self, older_than: float) -> list[str]:
        now = time.time()
        dead = [wid for wid in self._workers if self._age(wid, now) > older_than]
        for wid in dead:
            await self.delete_worker(wid)
        return dead

    # -- instances
    async def create_instance(self, spec: InstanceSpec) -> Instance:
        if spec.id in self._instances:
            raise StoreError(f"instance {spec.id} exists")
        inst = Instance(**spec.model_dump(), updated_at=time.time())
        self._instances[spec.id] = inst
        self._bump()
        return inst.model_copy()

    async def get_instance(self, instance_id: str) -> Instance | None:
        inst = self._instances.get(instance_id)
        return inst.model_copy() if inst else None

    async def list_instances(self, *, worker_id: str | None = None, model: str | None = None) -> list[Instance]:
        out = [
            i.model_copy()
            for i in self._instances.values()
            if (worker_id is None or i.worker_id == worker_id) and (model is None or i.model == model)
        ]
        return sorted(out, key=lambda i: i.id)

    async def update_instance(self, instance_id: str, **fields: object) -> Instance | None:
        inst = self._instances.get(instance_id)
        if inst is None:
            return None
        allowed = SPEC_FIELDS | {"state", "last_error"}
        for k, v in fields.items():
            if k not in allowed:
                raise StoreError(f"field {k} cannot be updated")
            setattr(inst, k, v)
        inst.updated_at = time.time()
        self._bump()
        return inst.model_copy()

    async def delete_instance(self, instance_id: str) -> bool:
        if self._instances.pop(instance_id, None) is None:
            return False
        self._bump()
        return True

    # -- deployments
    async def put_deployment(self, deployment: Deployment) -> Deployment:
        now = time.time()
        old = self._deployments.get(deployment.name)
        d = deployment.model_copy(update={"created_at": old.created_at if old else now, "updated_at": now,
                                          "error": None})
        self._deployments[d.name] = d
        self._bump()
        return d.model_copy()

    async def get_deployment(self, name: str) -> Deployment | None:
        d = self._deployments.get(name)
        return d.model_copy() if d else None

    async def list_deployments(self) -> list[Deployment]:
        return [d.model_copy() for _, d in sorted(self._deployments.items())]

    async def delete_deployment(self, name: str) -> bool:
        if self._deployments.pop(name, None) is None:
            return False
        self._bump()
        return True

    async def set_deployment_error(self, name: str, error: str | None) -> bool:
        d = self._deployments.get(name)
        if d is None:
            return False
        self._deployments[name] = d.model_copy(update={"error": error})
        return True

    async def set_deployment_scale(self, name: str, replicas: int, status: AutoscaleStatus | None) -> bool:
        d = self._deployments.get(name)
        if d is None:
            return False
        self._deployments[name] = d.model_copy(update={"replicas": replicas, "autoscale_status": status})
        return True

    # -- load reports
    async def put_load_report(self, report: LoadReport, ttl: float) -> None:
        now = time.time()
        self._loads = {k: v for k, v in self._loads.items() if v[1] > now}
        self._loads[report.source] = (report.model_copy(update={"expires_in": 0.0}), now + ttl)

    async def list_load_reports(self) -> list[LoadReport]:
        now = time.time()
        return [r.model_copy(update={"expires_in": exp - now}) for r, exp in self._loads.values() if exp > now]

    # -- leases
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        now = time.time()
        cur = self._leases.get(name)
        if cur is None:
            self._leases[name] = (holder, 1, now + ttl)
        elif cur[0] == holder and cur[2] > now:
            self._leases[name] = (holder, cur[1], now + ttl)
        elif cur[2] <= now:
            self._leases[name] = (holder, cur[1] + 1, now + ttl)
        else:
            return None
        h, token, exp = self._leases[name]
        return Lease(name=name, holder=h, token=token, expires_in=exp - now)

    async def release_lease(self, name: str, holder: str) -> None:
        cur = self._leases.get(name)
        if cur and cur[0] == holder:
            self._leases[name] = (holder, cur[1], time.time())

    async def get_lease(self, name: str) -> Lease | None:
        now = time.time()
        cur = self._leases.get(name)
        if cur is None or cur[2] <= now:
            return None
        return Lease(name=name, holder=cur[0], token=cur[1], expires_in=cur[2] - now)

    # -- revision
    async def get_revision(self) -> int:
        return self._revision

    async def bump_revision(self) -> int:
        return self._bump()

    async def advance_revision(self, at_least: int) -> int:
        self._revision = max(self._revision, at_least)
        return self._revision

    # -- api keys
    async def create_api_key(self, key: ApiKey) -> ApiKey:
        if key.id in self._keys:
            raise StoreError(f"api key {key.id} exists")
        k = key.model_copy(update={"created_at": time.time()})
        self._keys[k.id] = k
        self._meta = replace(self._meta, auth=AUTH_REQUIRED)
        self._bump()
        return k.model_copy()

    async def list_api_keys(self) -> list[ApiKey]:
        return [k.model_copy() for _, k in sorted(self._keys.items())]

    async def revoke_api_key(self, key_id: str) -> bool:
        k = self._keys.get(key_id)
        if k is None:
            return False
        k.revoked = True
        self._bump()
        return True
