"""OpenAI-format error bodies, used by every HTTP surface of modelfleet."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


class ApiError(Exception):
    """Raise from a handler to answer with an OpenAI-format error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def validation_error(errs: list[Any]) -> ApiError:
    """Malformed JSON -> 400; a field at fault -> 422 naming it (``param``)."""
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid body"}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON: {first.get('msg')}", code="invalid_json")
    msg = "; ".join(f"{_field_path(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errs[:5])
    return ApiError(422, msg, param=_field_path(tuple(first.get("loc", ()))), code="invalid_field")


# What every operation of a FastAPI app of ours may answer besides its success: documented
# in its OpenAPI document, so a client (and schemathesis's status-code check) knows it.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {
        "description": "an error in the OpenAI error body: 400/422 bad input (param names the field), "
        "401/403 missing or wrong token, 404, 409, 503 store unavailable",
        "content": {"application/json": {"schema": ERROR_SCHEMA}},
    }
}


def install_error_handlers(app: FastAPI) -> None:
    """Every error, validation included, leaves in the OpenAI error body; 422 names the field."""
    # Before any route is added: each route's documented responses include these.
    app.router.responses = {**ERROR_RESPONSES, **(app.router.responses or {})}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return error_response(err.status, err.message, param=err.param, code=err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
