"""The route table a gateway caches: a pure function of store contents and health."""

from __future__ import annotations

from typing import Any

from modelfleet.models import ApiKey, Deployment, Instance, InstanceState

ROUTABLE_STATES = (InstanceState.READY, InstanceState.DRAINING)


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
) -> dict[str, Any]:
    """Every known model (deployed or declared), with its routable instances.

    A model with zero routable instances stays listed, so a gateway can tell "no healthy
    instance" (503) from "no such model" (404). Only ready or draining instances on alive
    workers are routable; draining ones carry enabled=False (no new requests)."""
    models: dict[str, list[dict[str, Any]]] = {d.name: [] for d in deployments}
    for inst in instances:
        models.setdefault(inst.model, [])
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
        "models": [{"name": name, "instances": models[name]} for name in sorted(models)],
        "api_keys": [{"id": k.id, "secret_hash": k.secret_hash} for k in api_keys if not k.revoked],
        # Once any key was ever created, inference needs one: revoking the last key must
        # close the door, not open it.
        "auth_required": bool(api_keys),
    }
