"""The controller's side of model sources: the catalog, deployments that name a remote source
or a catalog entry, download progress in instance views, and the workers' model caches.

- ``prepare_deployment``: a ``POST /v1/cluster/deployments`` body filled from the catalog when it
  names an entry, its source checked and spelled canonically, and the model's size asked of the
  hub once (bounded by a timeout) and recorded in the deployment for placement. An ambiguous
  GGUF repository is refused with the list of its files; a hub that cannot be reached (or a
  token only the workers have) is not an error: the size falls back to the catalog's, else
  placement's default, and the worker reports any real problem on the instance.
- ``attach_downloads``: each instance's download progress, from its worker's last heartbeat.
- the router: ``GET /v1/cluster/catalog``, and ``/v1/cluster/workers/{id}/models/…`` (pull,
  downloads, cache, prune), passed to that worker's agent as instance logs are.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from modelfleet.catalog import CatalogEntry
from modelfleet.errors import ApiError
from modelfleet.hubs import FetchError, plan_source
from modelfleet.models import Deployment, DeploymentSpec, WorkerRecord
from modelfleet.sources import Plan, SourceError, parse_source

log = logging.getLogger("modelfleet.controller")


def _human(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def apply_catalog(body: DeploymentSpec, catalog: dict[str, CatalogEntry]) -> tuple[DeploymentSpec, CatalogEntry | None]:
    """Fill what the body leaves out from the catalog entry it names (``catalog``, or its name
    when it gives no source). Fields the body sets win; params are merged."""
    name = body.catalog or (body.name if not body.source else None)
    if name is None:
        return body, None
    entry = catalog.get(name)
    if entry is None:
        if body.catalog:
            raise ApiError(400, f"no catalog entry {name!r} (GET /v1/cluster/catalog lists them)", param="catalog")
        raise ApiError(
            400,
            f"deployment {body.name} has no source, and no catalog entry is called {name!r}: give "
            "the model's source (a path, a bundled name, hf://, modelscope://, https://)",
            param="source",
        )
    given = body.model_fields_set
    update: dict[str, Any] = {"params": {**entry.params, **body.params}}
    if "source" not in given or not body.source:
        update["source"] = entry.source
    if "backend" not in given:
        update["backend"] = entry.backend
    placement = body.placement.model_copy()
    if not placement.memory and entry.memory and not placement.gpus:
        placement.memory = entry.memory
    if not placement.gpu_memory and entry.gpu_memory and placement.gpus:
        placement.gpu_memory = entry.gpu_memory
    update["placement"] = placement
    return body.model_copy(update=update), entry


def infer_backend(plan: Plan) -> str:
    """The backend a repository's files call for, when the deployment names none: one GGUF is
    llama.cpp's; a sentence-transformers folder (modules.json) is embeddings; else a causal LM."""
    names = {f.path for f in plan.files}
    if plan.model_path.lower().endswith(".gguf"):
        return "llama.cpp"
    if names & {"modules.json", "config_sentence_transformers.json"}:
        return "sentence-transformers"
    return "transformers"


async def prepare_deployment(
    body: DeploymentSpec, catalog: dict[str, CatalogEntry], lookup_timeout: float
) -> Deployment:
    """The deployment to store for a create request (see the module docstring). Raises ApiError."""
    backend_given = "backend" in body.model_fields_set
    body, entry = apply_catalog(body, catalog)
    backend_given = backend_given or entry is not None
    if not body.source:
        raise ApiError(
            400,
            "a deployment needs a source (a path, a bundled name, hf://, modelscope://, https://) or a catalog entry",
            param="source",
        )
    d = Deployment(**body.model_dump())
    if d.backend == "openai":
        return d  # the source is the attached server's URL
    try:
        src = parse_source(d.source)
    except SourceError as exc:
        raise ApiError(400, str(exc), param="source") from None
    if src is None:
        return d  # local path or bundled name: placement measures it
    d.source = src.canonical
    fallback, why = (entry.size, "catalog") if entry is not None and entry.size else (0, "")
    try:
        plan = await asyncio.wait_for(
            asyncio.to_thread(plan_source, src, d.backend if backend_given else None, lookup_timeout),
            lookup_timeout + 2,
        )
    except FetchError as exc:
        if exc.kind == "ambiguous":
            raise ApiError(400, str(exc), param="source", code="ambiguous_source") from None
        reason = f"the hub was not asked successfully: {exc}"
    except TimeoutError:
        reason = f"the hub did not answer within {lookup_timeout:g} s"
    else:
        if not backend_given:
            d.backend = infer_backend(plan)
        if plan.total is not None:
            d.model_bytes = plan.total
            d.model_bytes_from = f"hub: {len(plan.files)} file(s), {_human(plan.total)}" + (
                f" at {plan.revision[:12]}" if plan.revision and src.is_hub else ""
            )
            return d
        reason = "the source does not say its size"
    d.model_bytes = fallback
    d.model_bytes_from = f"{why}: {_human(fallback)} ({reason})" if fallback else f"unknown ({reason})"
    log.info("deployment %s: size of %s unknown to the controller: %s", d.name, d.source, reason)
    return d


def attach_downloads(views: list[dict[str, Any]], workers: list[WorkerRecord]) -> None:
    """Add ``download`` (progress of the instance's model download, or None) to instance views."""
    by_instance: dict[tuple[str, str], dict[str, Any]] = {}
    for w in workers:
        for dl in w.resources.downloads:
            for iid in dl.instances:
                by_instance[(w.id, iid)] = dl.model_dump()
    for v in views:
        v["download"] = by_instance.get((v.get("worker_id") or "", v["id"]))


class PullBody(BaseModel):
    source: str = Field(min_length=1, max_length=2000)
    backend: str | None = Field(default=None, max_length=64)


class PruneBody(BaseModel):
    source: str | None = Field(default=None, max_length=2000)


async def call_worker(
    w: WorkerRecord, method: str, path: str, join_token: str | None, *, timeout_s: float = 10.0, **kwargs: Any
) -> Any:
    """Call a worker agent (``path`` under its root) and return its JSON; 502 when it does not
    answer, its own error status and message otherwise."""
    headers = {"authorization": f"Bearer {join_token}"} if join_token else {}
    url = f"http://{w.address}:{w.port}{path}"
    try:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
            r = await client.request(method, url, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        raise ApiError(502, f"worker {w.id} at {w.address}:{w.port} did not answer: {exc}") from exc
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise ApiError(r.status_code if r.status_code < 500 else 502, f"worker {w.id}: {message}")
    return r.json()


def models_router(
    ctl: Any, catalog: dict[str, CatalogEntry], join_token: str | None, admin: Any, cluster_read: Any
) -> APIRouter:
    router = APIRouter()

    async def worker(worker_id: str) -> WorkerRecord:
        w = await ctl.store.get_worker(worker_id)
        if w is None:
            raise ApiError(404, f"worker {worker_id} not found")
        return w

    @router.get("/v1/cluster/catalog")
    async def get_catalog(request: Request) -> dict[str, Any]:
        cluster_read(request)
        return {"data": [e.model_dump() for e in catalog.values()]}

    @router.post("/v1/cluster/workers/{worker_id}/models/pull", status_code=202)
    async def pull(worker_id: str, body: PullBody, request: Request) -> dict[str, Any]:
        admin(request)
        try:
            if parse_source(body.source) is None:
                raise ApiError(
                    400, f"{body.source!r} is not a remote source (hf://, modelscope://, https://)", param="source"
                )
        except SourceError as exc:
            raise ApiError(400, str(exc), param="source") from None
        return await call_worker(await worker(worker_id), "POST", "/v1/models/pull", join_token, json=body.model_dump())

    @router.get("/v1/cluster/workers/{worker_id}/models/downloads")
    async def downloads(worker_id: str, request: Request) -> dict[str, Any]:
        cluster_read(request)
        return await call_worker(await worker(worker_id), "GET", "/v1/models/downloads", join_token)

    @router.get("/v1/cluster/workers/{worker_id}/models/cache")
    async def cache(worker_id: str, request: Request) -> dict[str, Any]:
        cluster_read(request)
        return await call_worker(await worker(worker_id), "GET", "/v1/models/cache", join_token, timeout_s=30.0)

    @router.post("/v1/cluster/workers/{worker_id}/models/cache/prune")
    async def prune(worker_id: str, body: PruneBody, request: Request) -> dict[str, Any]:
        admin(request)
        return await call_worker(
            await worker(worker_id),
            "POST",
            "/v1/models/cache/prune",
            join_token,
            json=body.model_dump(),
            timeout_s=60.0,
        )

    return router
