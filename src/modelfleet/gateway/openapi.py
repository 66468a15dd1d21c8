"""The gateway's OpenAPI document for its inference routes (``GET /openapi.json``).

Built from the tables in gateway/validate.py (each check carries the JSON Schema of what it
accepts), so the document says exactly what the gateway enforces: a body the document calls
invalid is one the gateway refuses with 400 (or 404 for a model it does not serve). Fuzzers
(schemathesis in bench/chaos.py and tests/chaos) read it to attack the gateway.

``model`` is an enum of the models this gateway routes for the endpoint at the moment of the
call, when it knows any: what a client may send and be served. Optional fields accept
``null``, as the gateway treats ``null`` as absent. Fields OpenAI does not define pass through
to the backend (``additionalProperties``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from modelfleet import __version__
from modelfleet.gateway.validate import ENDPOINTS, PATHS, SCHEMAS, schema_of

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
# Why each refusal happens, as a client reads it.
REFUSALS = {
    "400": "invalid request: malformed JSON, a field of the wrong type or out of range (``param`` names it)",
    "401": "invalid or missing API key",
    "404": "no such model",
    "413": "request body too large",
    "429": "every instance of the model is at its limit and the queue is full (Retry-After)",
    "502": "the instance failed and no other could take the request",
    "503": "no healthy instance of the model",
    "504": "the instance did not answer in time",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def request_schema(endpoint: str, models: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON Schema of a request body for ``endpoint`` (chat, completions, embeddings)."""
    required, fields = SCHEMAS[endpoint]
    names = sorted(models)
    model: dict[str, Any] = {"type": "string", "minLength": 1}
    if names:
        model["enum"] = names
    props: dict[str, Any] = {"model": model}
    for name, check in fields.items():
        schema = schema_of(check)
        props[name] = schema if name == required else _nullable(schema)
    return {"type": "object", "required": ["model", required], "properties": props, "additionalProperties": True}


def document(models_by_endpoint: dict[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """OpenAPI 3.1 for POST /v1/chat/completions, /v1/completions and /v1/embeddings.
    ``models_by_endpoint``: the model names served per endpoint (chat, completions, embeddings)."""
    models_by_endpoint = models_by_endpoint or {}
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        ok = {
            "description": "the backend's answer, passed through (a stream when ``stream`` is true)",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {}}},
        }
        responses = {"200": ok}
        for status, why in REFUSALS.items():
            responses[status] = {"description": why, "content": {"application/json": {"schema": ERROR}}}
        paths[PATHS[endpoint]] = {
            "post": {
                "operationId": endpoint,
                "security": [{"bearer": []}, {}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": request_schema(endpoint, models_by_endpoint.get(endpoint, ()))}
                    },
                },
                "responses": responses,
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelfleet gateway", "version": __version__},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
