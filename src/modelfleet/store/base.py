"""The Store interface: every piece of cluster state goes through it.

Rules every backend keeps (DESIGN.md principles 4 and 5):
- liveness times come from the store's own clock (SQL ``now()``, Redis ``TIME``);
  ``heartbeat_age`` is computed by the store when read, never written by a sweeper;
- every write is one atomic statement or transaction (upserts, never read-then-insert);
- unique keys have no NULL column;
- a heartbeat with no instance change costs one write (the worker row);
- time during which the store took no heartbeat at all does not count against a worker: a
  controller that regains the store calls ``record_outage()``, which adds that time to a
  store-side "paused" total, and ``heartbeat_age`` leaves paused time out (see
  docs/control-plane.md, "Liveness across a store outage");
- a store has a cluster identity, written once when its schema is first created; a store
  that lost its state shows none, or a new one, and controllers refuse to serve from it;
- the routing revision only grows; a fresh store starts it at the time in milliseconds, so a
  store that lost its state (and starts again) is far above any revision a reader holds.

A backend that cannot reach its server raises ``StoreUnavailable``; callers turn
that into "not ready" / HTTP 503 and nothing is half-written.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

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


class StoreError(Exception):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """The store's server cannot be reached or answered with a transient error."""


class StoreConfigError(StoreError):
    """The store URL is wrong (unknown scheme, bad host, failed authentication)."""


AUTH_NONE = "none"  # no API key was ever created: inference is open (embedded default)
AUTH_REQUIRED = "required"  # a key was created once: inference needs one, even with none left
AUTH_OPENED = "opened"  # an admin opened inference again explicitly (``modelfleet keys open``)


@dataclass(frozen=True)
class ClusterMeta:
    """The store's identity and the cluster-wide auth state."""

    cluster_id: str | None  # None: the store holds no identity (never migrated, or lost its state)
    auth: str = AUTH_NONE
    # Cluster ids an operator accepted this store in place of (``modelfleet store accept``):
    # gateways that remember one of them take this store's tables.
    replaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Persistence:
    """Whether the store keeps its data across a restart of its server."""

    kind: str  # "durable" | "volatile" | "unknown"
    detail: str = ""


@dataclass(frozen=True)
class HeartbeatResult:
    registered: bool  # True when this heartbeat created the worker row
    revision: int  # the routing revision after this heartbeat


# Instance fields that the scheduler / API may change with update_instance().
SPEC_FIELDS = frozenset(
    {"worker_id", "weight", "max_concurrency", "enabled", "pending_reason", "params", "backend", "source"}
)


class Store(abc.ABC):
    """Async interface to the cluster state. One instance per process, safe for concurrent use."""

    url_scheme: str = ""

    # -- lifecycle -----------------------------------------------------------------
    @abc.abstractmethod
    async def migrate(self) -> None:
        """Create or upgrade the schema (Alembic for SQL). Idempotent; safe to race."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers and is migrated."""

    @abc.abstractmethod
    async def now(self) -> float:
        """The store's clock, epoch seconds."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def persistence(self) -> Persistence:
        """Does the server keep the data across its own restart? SQL servers and SQLite files do."""
        return Persistence("durable")

    # -- identity and auth state -----------------------------------------------------
    @abc.abstractmethod
    async def get_cluster_meta(self) -> ClusterMeta:
        """The identity ``migrate()`` wrote when it created the schema, and the auth state.

        A store with no schema or no identity (lost its state) gives ``cluster_id=None``
        rather than an error; an unreachable one raises StoreUnavailable."""

    @abc.abstractmethod
    async def open_inference(self) -> None:
        """Auth state -> "opened" (an explicit admin act); bumps the revision."""

    @abc.abstractmethod
    async def record_accepted(self, replaced_cluster_id: str, auth_required: bool) -> None:
        """An operator accepted this store in place of ``replaced_cluster_id``: add it to
        ``replaces``; with ``auth_required``, set the auth state to "required" unless it is
        already; bumps the revision."""

    # -- liveness across outages -------------------------------------------------------
    @abc.abstractmethod
    async def record_outage(self) -> float:
        """Called by a controller that (re)gains the store, before it takes heartbeats.

        The time from the latest heartbeat the store took (or the end of the last recorded
        outage, if later) until now is added to the paused total: no heartbeat landed then,
        so it must not count against any worker. Atomic; several controllers calling it for
        one outage count it once. Returns the seconds added."""

    # -- workers -------------------------------------------------------------------
    # -- workers -------------------------------------------------------------------
    @abc.abstractmethod
    async def heartbeat(
        self, worker: WorkerInfo, statuses: list[InstanceStatus] | None = None
    ) -> HeartbeatResult:
        """Upsert the worker with last_heartbeat = store now.

        ``statuses`` is None when the worker's instances did not change since its last
        report: then this is a single write. Otherwise, in the same transaction:
        - instances known to the store whose worker_id is THIS worker get their observed fields
          updated (a report about an instance since moved elsewhere changes nothing);
        - instances the worker declared itself (``status.declared``) are upserted with
          ``deployment=None`` and ``worker_id`` = this worker;
        - worker-declared instances of this worker that are no longer reported are deleted;
        - the routing revision is bumped.
        """

    @abc.abstractmethod
    async def list_workers(self) -> list[WorkerRecord]:
        """All workers, each with heartbeat_age computed against the store clock, leaving
        out paused time (``record_outage``)."""

    @abc.abstractmethod
    async def get_worker(self, worker_id: str) -> WorkerRecord | None: ...

    @abc.abstractmethod
    async def delete_worker(self, worker_id: str) -> bool:
        """Delete a worker and the instances it declared itself; bumps the revision."""

    @abc.abstractmethod
    async def delete_dead_workers(self, older_than: float) -> list[str]:
        """Delete workers whose heartbeat_age (paused time left out) exceeds ``older_than`` seconds (GC).

        The age test and the delete are one statement, so a worker that heartbeats
        concurrently is never deleted."""

    # -- instances -----------------------------------------------------------------
    @abc.abstractmethod
    async def create_instance(self, spec: InstanceSpec) -> Instance:
        """Insert a new instance (state pending). Raises StoreError if the id exists."""

    @abc.abstractmethod
    async def get_instance(self, instance_id: str) -> Instance | None: ...

    @abc.abstractmethod
    async def list_instances(
        self, *, worker_id: str | None = None, model: str | None = None
    ) -> list[Instance]: ...

    @abc.abstractmethod
    async def update_instance(self, instance_id: str, **fields: object) -> Instance | None:
        """Change spec fields (see SPEC_FIELDS) or ``state``/``last_error``; bumps the revision."""

    @abc.abstractmethod
    async def delete_instance(self, instance_id: str) -> bool: ...

    # -- deployments ---------------------------------------------------------------
    @abc.abstractmethod
    async def put_deployment(self, deployment: Deployment) -> Deployment:
        """Create or replace (upsert) a deployment by name; bumps the revision. Clears its
        ``error``: a changed deployment is judged afresh by the next reconcile pass."""

    @abc.abstractmethod
    async def get_deployment(self, name: str) -> Deployment | None: ...

    @abc.abstractmethod
    async def list_deployments(self) -> list[Deployment]: ...

    @abc.abstractmethod
    async def delete_deployment(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def set_deployment_error(self, name: str, error: str | None) -> bool:
        """Record (or clear, with None) why the reconciler cannot act on a deployment, in one
        atomic write that leaves the rest of the deployment as it is (a concurrent change by
        an operator is never overwritten). No revision bump: routing does not change. False
        when no such deployment exists."""

    @abc.abstractmethod
    async def set_deployment_scale(self, name: str, replicas: int, status: AutoscaleStatus | None) -> bool:
        """The autoscaler's write: the deployment's ``replicas`` and ``autoscale_status``, in
        one atomic write that leaves every other field as it is (an operator's concurrent
        change of anything else is kept). No revision bump: routing does not change until
        the reconciler acts. False when no such deployment exists."""

    # -- load reports (autoscaling) ------------------------------------------------------
    @abc.abstractmethod
    async def put_load_report(self, report: LoadReport, ttl: float) -> None:
        """Upsert ``report`` by its source; it expires ``ttl`` seconds after now, by the
        store's clock. Expired reports may be deleted in the same write."""

    @abc.abstractmethod
    async def list_load_reports(self) -> list[LoadReport]:
        """Every unexpired report, each with ``expires_in`` against the store's clock."""

    # -- leases --------------------------------------------------------------------
    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Take the lease if free or expired, or renew it if ``holder`` has it.

        Returns the lease when ``holder`` holds it after the call, else None. The fencing
        token grows every time the lease changes hands and never decreases."""

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Expire the lease now if ``holder`` has it (clean shutdown)."""

    @abc.abstractmethod
    async def get_lease(self, name: str) -> Lease | None:
        """The current lease, or None when nobody holds an unexpired one."""

    # -- routing revision ----------------------------------------------------------
    @abc.abstractmethod
    async def get_revision(self) -> int: ...

    @abc.abstractmethod
    async def bump_revision(self) -> int:
        """Atomically increment the routing revision and return the new value."""

    @abc.abstractmethod
    async def advance_revision(self, at_least: int) -> int:
        """Atomically raise the revision to ``at_least`` if it is lower; return the revision.

        For a store restored from an older copy: a reader that saw a higher revision must
        never see a lower one."""

    # -- api keys ------------------------------------------------------------------
    @abc.abstractmethod
    async def create_api_key(self, key: ApiKey) -> ApiKey:
        """Insert the key and, in the same write, set the auth state to "required"."""

    @abc.abstractmethod
    async def list_api_keys(self) -> list[ApiKey]: ...

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str) -> bool:
        """Mark the key revoked; bumps the revision so gateways drop it on their next refresh."""
