"""API keys for inference: sha256 of the bearer secret, looked up in the set of hashes the
controller publishes with the routes. Hashing first means the lookup time depends on the
hash, not on how much of a real key a guess shares, so it is no timing oracle."""

from __future__ import annotations

from modelfleet.auth import hash_secret, parse_bearer


def bearer_token(value: bytes | None) -> str | None:
    """The secret of an ``Authorization: Bearer <secret>`` header value (raw ASGI bytes), or None."""
    if not value:
        return None
    try:
        return parse_bearer(value.decode("ascii"))
    except UnicodeDecodeError:
        return None


def key_allowed(header: bytes | None, key_hashes: frozenset[str], required: bool) -> bool:
    """Open only while no key was ever created (``required`` false); else the bearer secret's
    hash must be a live one. Revoking the last key therefore closes inference, never opens it."""
    if not required:
        return True
    token = bearer_token(header)
    return token is not None and hash_secret(token) in key_hashes
