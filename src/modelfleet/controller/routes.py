"""The route table a gateway caches: a pure function of store contents and health."""

from __future__ import annotations

from typing import Any

from modelfleet.models import ApiKey, Deployment, Instance, InstanceState
from modelfleet.store.base import AUTH_REQUIRED, ClusterMeta

ROUTABLE_STATES = (InstanceState.READY, InstanceState.DRAINING)
STARTING_STATES = (InstanceState.PENDING, InstanceState.DOWNLOADING, InstanceState.STARTING)

CHAT_AND_COMPLETIONS = ("chat", "completions")


def model_endpoints(backend: str, params: dict[str, Any]) -> list[str] | None:
    """What a model of ``backend`` serves: a subset of chat, completions, embeddings; None when
    unknown (an attached server, a plug-in backend), and then the gateway lets every endpoint
    through and the server answers for itself. The gateway refuses the others with 400."""
    if backend == "sentence-transformers":
        return ["embeddings"]
    if backend in ("llama.cpp", "llama-cpp-python"):
        # llama.cpp embeds only when started for it (the `embedding`/`embeddings` flag).
        embeds = any(params.get(k) in (True, "true", "True", 1) for k in ("embedding", "embeddings"))
        return [*CHAT_AND_COMPLETIONS, "embeddings"] if embeds else list(CHAT_AND_COMPLETIONS)
    if backend == "vllm":
        # A pooling model (`--runner pooling`, or `--task embed` before vLLM 0.10) embeds and
        # does nothing else.
        if params.get("runner") == "pooling" or params.get("task") in ("embed", "embedding"):
            return ["embeddings"]
        return list(CHAT_AND_COMPLETIONS)
    if backend == "transformers":
        return list(CHAT_AND_COMPLETIONS)
    return None


def model_routing(routing: str, endpoints: list[str] | None) -> str:
    """The routing mode gateways use for a model: the deployment's choice; "auto" (and
    declared instances) is "p2c" for now. bench/prefix.py did not bear prefix routing out as
    a default: on llama-cpp-python's server (one request at a time) no gain without slack,
    hot spots with it; on llama-server (slots) -8 % mean TTFT where an oracle got -23 %
    (docs/gateway.md). Embedding-only models are "p2c" whatever the deployment says: their
    requests never have a key."""
    if endpoints is not None and "chat" not in endpoints and "completions" not in endpoints:
        return "p2c"
    if routing in ("p2c", "prefix"):
        return routing
    return "p2c"


def build_route_table(
    *,
    revision: int,
    store_time: float,
    controller_id: str,
    ttl: float,
    alive: set[str],
    instances: list[Instance],
    deployments: list[Deployment],
    api_keys: list[ApiKey],
    meta: ClusterMeta,
) -> dict[str, Any]:
    """Every known model (deployed or declared), with its routable instances.

    A model with zero routable instances stays listed, so a gateway can tell "no healthy
    instance" (503) from "no such model" (404). Only ready or draining instances on alive
    workers are routable; draining ones carry enabled=False (no new requests).

    ``cluster_id`` lets gateways refuse a table from a store that lost its state (unless it
    ``replaces`` theirs); ``auth`` is the store's auth state ("none", "required", "opened")."""
    models: dict[str, list[dict[str, Any]]] = {d.name: [] for d in deployments}
    # Whether a request that finds no ready instance should wait for one (gateway cold-start
    # hold): a deployment that wants replicas or autoscales (it starts one on demand), or an
    # instance on its way up. A deployment parked at 0 fixed replicas: no, 503 at once.
    hold: dict[str, bool] = {d.name: d.replicas > 0 or d.autoscale is not None for d in deployments}
    endpoints: dict[str, list[str] | None] = {d.name: model_endpoints(d.backend, d.params) for d in deployments}
    chosen = {d.name: d.routing for d in deployments}
    for inst in instances:
        models.setdefault(inst.model, [])
        if inst.model not in endpoints:  # declared by its worker: what its own backend serves
            endpoints[inst.model] = model_endpoints(inst.backend, inst.params)
        if inst.state in STARTING_STATES:
            hold[inst.model] = True
        if inst.state not in ROUTABLE_STATES or not inst.endpoint or inst.worker_id not in alive:
            continue
        models[inst.model].append(
            {
                "id": inst.id,
                "worker_id": inst.worker_id,
                "endpoint": inst.endpoint,
                "weight": inst.weight,
                "max_concurrency": inst.max_concurrency,
                "enabled": inst.enabled and inst.state == InstanceState.READY,
                "state": inst.state.value,
            }
        )
    return {
        "revision": revision,
        "store_time": store_time,
        "controller_id": controller_id,
        "heartbeat_ttl": ttl,
        "models": [{"name": name, "instances": models[name], "endpoints": endpoints[name],
                    "routing": model_routing(chosen.get(name, "auto"), endpoints[name]),
                    "hold": hold.get(name, False)} for name in sorted(models)],
        "api_keys": [{"id": k.id, "secret_hash": k.secret_hash} for k in api_keys if not k.revoked],
        # Once any key was ever created, inference needs one: revoking the last key, or a key
        # table that is suddenly empty, must close the door, not open it. Only an admin's
        # explicit `keys open` (auth "opened", with no live key) opens it again.
        "auth": meta.auth,
        "auth_required": meta.auth == AUTH_REQUIRED or any(not k.revoked for k in api_keys),
        "cluster_id": meta.cluster_id,
        "replaces": list(meta.replaces),
    }
