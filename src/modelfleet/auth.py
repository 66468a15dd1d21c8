"""Token checks shared by controller and worker: constant-time, never logged."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request

from modelfleet.errors import ApiError


def parse_bearer(value: str) -> str | None:
    """The secret of an ``Authorization: Bearer <secret>`` header value, or None."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def bearer(request: Request) -> str | None:
    return parse_bearer(request.headers.get("authorization", ""))


def tokens_equal(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def check_token(request: Request, accepted: list[str | None], *, what: str, missing_status: int = 401) -> None:
    """``check_authorization`` on a request's Authorization header."""
    check_authorization(request.headers.get("authorization", ""), accepted, what=what, missing_status=missing_status)


def check_authorization(header: str, accepted: list[str | None], *, what: str, missing_status: int = 401) -> None:
    """Pass when no token is configured (embedded default) or the bearer matches one.

    Missing token -> ``missing_status`` (401, or 403 for the join token as the issue asks);
    wrong token -> 403. The token itself never reaches an error message or a log."""
    configured = [t for t in accepted if t]
    if not configured:
        return
    given = parse_bearer(header)
    if given is None:
        raise ApiError(missing_status, f"{what} required (Authorization: Bearer …)", code="missing_token")
    if not any(tokens_equal(given, t) for t in configured):
        raise ApiError(403, f"wrong {what}", code="wrong_token")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key() -> tuple[str, str, str]:
    """(key id, secret, sha256 of secret). The secret is shown once and never stored."""
    key_id = "key-" + secrets.token_hex(4)
    secret = "mf-" + secrets.token_urlsafe(32)
    return key_id, secret, hash_secret(secret)
