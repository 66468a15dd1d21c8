"""The cluster's data model, shared by store, controller, worker and gateway.

These are plain pydantic models: the store persists them, the HTTP APIs speak them.
Times that matter for liveness (last_heartbeat) come from the store's clock and are
carried as seconds since the epoch *of the store*; health is computed from
``heartbeat_age``, which the store computes against its own clock when read.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# -- the limits the store and ids need (store/migrations/versions/0001_initial.py) ---------------
ID_MAX_LEN = 128  # instance, worker and key ids: String(128) columns
NAME_MAX_LEN = 255  # model, deployment, backend names: String(255) columns
# A replica's id is "<deployment>-<8 hex digits>" (reconciler.new_replica): the name must leave room.
REPLICA_SUFFIX_LEN = 9
DEPLOYMENT_NAME_MAX_LEN = ID_MAX_LEN - REPLICA_SUFFIX_LEN
INT32_MAX = 2**31 - 1  # weight, max_concurrency and restarts are Integer columns (32 bits in SQL)
MAX_CONCURRENCY = 100_000  # requests one instance takes at once: far above any runner's slots
MAX_REPLICAS = 1000
SOURCE_MAX_LEN = 4096  # a path, a URL or a repo id (a Text column: 64 KiB in MySQL)
PARAMS_MAX_BYTES = 64 * 1024  # backend parameters, as JSON
LABELS_MAX = 64
LABEL_KEY_MAX_LEN, LABEL_VALUE_MAX_LEN = 128, 255
MAX_BYTES = 2**50  # memory figures (1 PiB): exact in every store's JSON
ERROR_MAX_LEN = 8192  # a runner's last error, kept (truncated) rather than refused


def store_safe(value: str) -> str:
    """A string every store can hold: no NUL (PostgreSQL refuses it in text) and valid UTF-8
    (no lone surrogates, which JSON can carry but no driver can encode)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from None
    return value


def _params_ok(params: dict[str, Any]) -> dict[str, Any]:
    """Backend parameters: JSON of at most PARAMS_MAX_BYTES, every string store-safe."""
    try:
        size = len(orjson.dumps(params))
    except TypeError as exc:  # pragma: no cover - JSON input is always serializable
        raise ValueError(f"must be JSON: {exc}") from None
    if size > PARAMS_MAX_BYTES:
        raise ValueError(f"must be at most {PARAMS_MAX_BYTES} bytes as JSON, got {size}")
    _walk_strings(params)
    return params


def _walk_strings(value: Any) -> None:
    if isinstance(value, str):
        store_safe(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            store_safe(k)
            _walk_strings(v)
    elif isinstance(value, list):
        for v in value:
            _walk_strings(v)


def _json_text(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _truncate(limit: int) -> Any:
    def cut(value: Any) -> Any:
        return value[:limit] if isinstance(value, str) else value

    return BeforeValidator(cut)


SafeStr = Annotated[str, AfterValidator(store_safe)]
LabelKey = Annotated[str, Field(min_length=1, max_length=LABEL_KEY_MAX_LEN), AfterValidator(store_safe)]
LabelValue = Annotated[str, Field(max_length=LABEL_VALUE_MAX_LEN), AfterValidator(store_safe)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=LABELS_MAX)]
DeploymentName = Annotated[str, Field(min_length=1, max_length=DEPLOYMENT_NAME_MAX_LEN,
                                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]
BackendName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]
Source = Annotated[str, Field(max_length=SOURCE_MAX_LEN), AfterValidator(store_safe)]
Params = Annotated[dict[str, Any], AfterValidator(_params_ok)]
Replicas = Annotated[int, Field(ge=0, le=MAX_REPLICAS)]
Concurrency = Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]
Weight = Annotated[int, Field(ge=0, le=INT32_MAX)]
Bytes = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Routing = Literal["auto", "p2c", "prefix"]


class GPU(BaseModel):
    index: int
    name: str
    memory_total: int = 0  # bytes
    memory_free: int = 0  # bytes


class DownloadProgress(BaseModel):
    """A model download on a worker (worker/downloads.py), as its heartbeat reports it."""

    source: Source  # canonical remote source
    backend: SafeStr | None = Field(default=None, max_length=NAME_MAX_LEN)
    instances: list[Annotated[SafeStr, Field(max_length=ID_MAX_LEN)]] = Field(default_factory=list, max_length=1000)
    pulled: bool = False  # started by `modelfleet models pull`
    state: str = "downloading"  # resolving, downloading, done, failed
    done: int = 0  # bytes on disk
    total: int | None = None  # bytes, when the source says
    files: int = 0
    rate: float = 0.0  # bytes per second, recent
    eta_s: float | None = None
    elapsed_s: float = 0.0
    error: Annotated[SafeStr | None, _truncate(ERROR_MAX_LEN)] = None
    path: Source | None = None  # where it lies, once done


class InstanceSlots(BaseModel):
    """A llama-server instance's slots, from its own /slots and /metrics (worker/slots.py).

    ``busy``/``queue`` are now; the token counts are cumulative since the runner started."""

    instance: SafeStr = Field(min_length=1, max_length=ID_MAX_LEN)
    slots: int = 0  # parallel slots of the server
    busy: int = 0  # slots decoding a request now
    queue: int = 0  # requests waiting in the server for a free slot (llamacpp:requests_deferred)
    prompt_tokens: int = 0  # prompt tokens computed (not from the cache)
    prompt_tokens_cached: int = 0  # prompt tokens reused from a slot's cache
    generated_tokens: int = 0
    cache_reuse: float | None = None  # cached / (cached + computed); None before any prompt
    error: Annotated[SafeStr | None, _truncate(ERROR_MAX_LEN)] = None  # the last scrape failed: why


class Resources(BaseModel):
    cpu_cores: int = 0
    memory_total: int = 0  # bytes
    memory_free: int = 0  # bytes
    gpus: list[GPU] = Field(default_factory=list)
    # The model cache (worker/modelcache.py): remote sources complete on this worker (canonical
    # spelling, what placement compares), downloads under way, free bytes where the cache lives.
    cached_models: list[Source] = Field(default_factory=list, max_length=10_000)
    downloads: list[DownloadProgress] = Field(default_factory=list, max_length=1000)
    disk_free: int | None = None
    # llama-server instances' slots (busy, queue, prompt-cache reuse), scraped every heartbeat.
    slots: list[InstanceSlots] = Field(default_factory=list, max_length=1000)


class InstanceState(enum.StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"  # fetching a remote source into the worker's cache
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"


class WorkerInfo(BaseModel):
    """What a worker says about itself in every heartbeat."""

    id: SafeStr = Field(min_length=1, max_length=ID_MAX_LEN)
    name: SafeStr = Field(min_length=1, max_length=128)
    address: SafeStr = Field(min_length=1, max_length=255)
    port: int = Field(ge=0, le=65535)
    labels: Labels = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    version: Annotated[SafeStr, _truncate(NAME_MAX_LEN)] = ""


class WorkerRecord(WorkerInfo):
    """A worker as the store knows it. ``heartbeat_age`` is computed by the store, on read."""

    last_heartbeat: float = 0.0  # store clock, epoch seconds
    registered_at: float = 0.0  # store clock, epoch seconds
    heartbeat_age: float = 0.0  # store_now - last_heartbeat, seconds


class InstanceSpec(BaseModel):
    """The desired part of an instance: what should run, and where."""

    id: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=255)  # the name clients send
    deployment: str | None = None  # None for instances a worker declared itself
    worker_id: str | None = None  # None while unplaced (pending)
    backend: str = "llama.cpp"
    source: str = ""  # model path / bundled name / URL for `openai`
    params: dict[str, Any] = Field(default_factory=dict)
    weight: int = Field(default=100, ge=0)
    max_concurrency: int = Field(default=4, ge=1)
    enabled: bool = True  # False: draining, gets no new requests
    # Why a pending instance is not placed (scheduler's reason), or None.
    pending_reason: str | None = None


class InstanceStatus(BaseModel):
    """The observed part of an instance, as its worker reports it (bounded to what the store holds)."""

    id: SafeStr = Field(min_length=1, max_length=ID_MAX_LEN)
    state: InstanceState = InstanceState.PENDING
    endpoint: SafeStr | None = Field(default=None, max_length=2048)  # base URL, e.g. http://10.0.0.2:30001
    restarts: Annotated[int, BeforeValidator(lambda v: min(v, INT32_MAX) if isinstance(v, int) else v)] = 0
    last_error: Annotated[SafeStr | None, _truncate(ERROR_MAX_LEN)] = None
    # True for instances the worker declared itself (--model): the store creates their rows
    # from this status. Assigned instances (from a deployment) are never created by a report.
    declared: bool = False
    model: SafeStr | None = Field(default=None, min_length=1, max_length=NAME_MAX_LEN)  # a declared instance's spec
    backend: SafeStr | None = Field(default=None, max_length=NAME_MAX_LEN)
    source: Source | None = None
    max_concurrency: Concurrency | None = None
    pid: int | None = None


class Instance(InstanceSpec):
    state: InstanceState = InstanceState.PENDING
    endpoint: str | None = None
    restarts: int = 0
    last_error: str | None = None
    updated_at: float = 0.0  # store clock


class Placement(BaseModel):
    """Where a deployment's replicas may go, as the store holds it."""

    labels: dict[str, str] = Field(default_factory=dict)
    gpus: int = Field(default=0, ge=0)
    gpu_memory: int = Field(default=0, ge=0)  # bytes per replica, 0 = estimate
    memory: int = Field(default=0, ge=0)  # bytes of RAM per replica, 0 = estimate
    cpu: float = Field(default=0, ge=0)
    policy: str = Field(default="spread", pattern="^(spread|binpack)$")


class PlacementSpec(Placement):
    """Placement as an operator sends it: bounded."""

    labels: Labels = Field(default_factory=dict)
    gpus: int = Field(default=0, ge=0, le=64)
    gpu_memory: Bytes = 0
    memory: Bytes = 0
    cpu: float = Field(default=0, ge=0, le=4096)


class AutoscalePolicy(BaseModel):
    """Replicas follow the load (issue 12; controller/autoscaler.py decides, docs/autoscaling.md).

    Load is requests in flight plus queued at every gateway, summed; desired replicas are
    load / ``target_ongoing``, averaged over ``window_s``, within [min, max]; a change waits
    ``up_delay_s`` (up) or ``down_delay_s`` (down) of steady advice and moves at most
    ``max_step`` replicas at once. With ``min_replicas`` 0 the replicas stop after
    ``idle_after_s`` with no request at all, and the first request starts one (held by the
    gateway meanwhile)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(default=4, ge=1, le=MAX_REPLICAS)
    target_ongoing: float = Field(default=4.0, gt=0, le=MAX_CONCURRENCY)
    idle_after_s: float = Field(default=300.0, ge=1, le=7 * 86400)
    up_delay_s: float = Field(default=2.0, ge=0, le=3600)
    down_delay_s: float = Field(default=30.0, ge=0, le=86400)
    window_s: float = Field(default=5.0, ge=1, le=3600)
    max_step: int = Field(default=4, ge=1, le=MAX_REPLICAS)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalePolicy:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class AutoscaleStatus(BaseModel):
    """The autoscaler's last decision for a deployment, as `modelfleet models` shows it."""

    desired: int = 0
    load: float = 0.0  # smoothed cluster-wide load the decision saw
    reason: str = ""
    at: float = 0.0  # epoch seconds (the deciding controller's clock)


class ModelLoad(BaseModel):
    in_flight: int = Field(default=0, ge=0, le=10_000_000)
    queued: int = Field(default=0, ge=0, le=10_000_000)


class InstanceLoad(BaseModel):
    in_flight: int = Field(default=0, ge=0, le=10_000_000)
    enabled: bool = True  # this gateway still sends it new requests


class LoadReport(BaseModel):
    """What one gateway process reports every second (POST /v1/cluster/load). It lives in the
    store for a time to live: a gateway that dies stops counting when its last report expires."""

    model_config = ConfigDict(extra="forbid")

    source: SafeStr = Field(min_length=1, max_length=255)  # gateway id and process
    revision: int = -1  # the route table revision this gateway serves
    models: dict[Annotated[SafeStr, Field(max_length=NAME_MAX_LEN)], ModelLoad] = Field(
        default_factory=dict, max_length=10_000)
    instances: dict[Annotated[SafeStr, Field(max_length=ID_MAX_LEN)], InstanceLoad] = Field(
        default_factory=dict, max_length=100_000)
    expires_in: float = 0.0  # on read: seconds until it expires, against the store's clock


class DeploymentFields(BaseModel):
    """A deployment as the store holds it. Lenient on purpose: a row written before a limit
    existed must still be read (and then reported as failing), never break every listing."""

    name: str
    backend: str = "llama.cpp"
    source: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    replicas: int = 1
    max_concurrency: int = 4
    placement: Placement = Field(default_factory=Placement)
    weight: int = 100
    catalog: str | None = None  # the catalog entry that filled it (see DeploymentSpec)
    # How gateways pick an instance for a request: "p2c" (least outstanding, power of two
    # choices), "prefix" (where the prompt's prefix is cached, within a load bound; gateway/
    # prefix.py) or "auto" (the default: controller/routes.py model_routing).
    routing: str = "auto"
    # None: a fixed replica count. Set: `replicas` is the autoscaler's to change.
    autoscale: AutoscalePolicy | None = None
    # Written by the autoscaler only. A JSON string is taken too: MariaDB's JSON_SET stores it so.
    autoscale_status: Annotated[AutoscaleStatus | None, BeforeValidator(_json_text)] = None


class DeploymentSpec(DeploymentFields):
    """What an operator asks for (the body of `POST /v1/cluster/deployments`), within the
    limits the store and the ids need: the name leaves room for a replica id of at most
    ID_MAX_LEN characters, integers fit the store's columns, params are at most
    PARAMS_MAX_BYTES. Out of range: 422 naming the field."""

    name: DeploymentName
    backend: BackendName = "llama.cpp"
    source: Source = ""
    params: Params = Field(default_factory=dict)
    replicas: Replicas = 1
    max_concurrency: Concurrency = 4
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    weight: Weight = 100
    # A catalog entry (modelfleet.catalog) whose source, backend and defaults fill what the
    # request leaves out; None when the source is given.
    catalog: Annotated[SafeStr, Field(min_length=1, max_length=NAME_MAX_LEN)] | None = None
    routing: Routing = "auto"


class Deployment(DeploymentFields):
    created_at: float = 0.0
    updated_at: float = 0.0
    # Why the reconciler cannot act on this deployment (None: fine). Set by the lease holder,
    # cleared by any change of the deployment and by the first pass that succeeds.
    error: str | None = None
    # Bytes of the model's files for placement, from the hub (asked once, when the deployment is
    # created), the catalog, or the disk; 0 = unknown (placement assumes a default).
    model_bytes: int = Field(default=0, ge=0)
    model_bytes_from: str = ""  # where model_bytes came from, or why it is unknown


class Lease(BaseModel):
    name: str
    holder: str
    token: int  # fencing token: only grows
    expires_in: float  # seconds left, against the store's clock


class ApiKey(BaseModel):
    id: str
    name: str
    secret_hash: str  # sha256 hex of the secret; the secret itself is never stored
    created_at: float = 0.0
    revoked: bool = False
