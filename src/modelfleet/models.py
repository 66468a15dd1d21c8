"""The cluster's data model, shared by store, controller, worker and gateway.

These are plain pydantic models: the store persists them, the HTTP APIs speak them.
Times that matter for liveness (last_heartbeat) come from the store's clock and are
carried as seconds since the epoch *of the store*; health is computed from
``heartbeat_age``, which the store computes against its own clock when read.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, Field


class GPU(BaseModel):
    index: int
    name: str
    memory_total: int = 0  # bytes
    memory_free: int = 0  # bytes


class Resources(BaseModel):
    cpu_cores: int = 0
    memory_total: int = 0  # bytes
    memory_free: int = 0  # bytes
    gpus: list[GPU] = Field(default_factory=list)


class InstanceState(enum.StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"


class WorkerInfo(BaseModel):
    """What a worker says about itself in every heartbeat."""

    id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=128)
    address: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=0, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    version: str = ""


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
    """The observed part of an instance, as its worker reports it."""

    id: str
    state: InstanceState = InstanceState.PENDING
    endpoint: str | None = None  # base URL of the runner, e.g. http://10.0.0.2:30001
    restarts: int = 0
    last_error: str | None = None
    # True for instances the worker declared itself (--model): the store creates their rows
    # from this status. Assigned instances (from a deployment) are never created by a report.
    declared: bool = False
    model: str | None = None  # spec of a declared instance, carried in its status
    backend: str | None = None
    source: str | None = None
    max_concurrency: int | None = None
    pid: int | None = None


class Instance(InstanceSpec):
    state: InstanceState = InstanceState.PENDING
    endpoint: str | None = None
    restarts: int = 0
    last_error: str | None = None
    updated_at: float = 0.0  # store clock


class Placement(BaseModel):
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: int = Field(default=0, ge=0)
    gpu_memory: int = Field(default=0, ge=0)  # bytes per replica, 0 = estimate
    memory: int = Field(default=0, ge=0)  # bytes of RAM per replica, 0 = estimate
    cpu: float = Field(default=0, ge=0)
    policy: str = Field(default="spread", pattern="^(spread|binpack)$")


class DeploymentSpec(BaseModel):
    """What an operator asks for (the body of `POST /v1/cluster/deployments`)."""

    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    backend: str = "llama.cpp"
    source: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=0, le=1000)
    max_concurrency: int = Field(default=4, ge=1)
    placement: Placement = Field(default_factory=Placement)
    weight: int = Field(default=100, ge=0)


class Deployment(DeploymentSpec):
    created_at: float = 0.0
    updated_at: float = 0.0


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
