"""Store backends, chosen by URL: memory://, sqlite:///PATH, postgresql://, mysql://, redis://."""

from __future__ import annotations

from urllib.parse import urlsplit

from modelfleet.store.base import Store, StoreConfigError, StoreError, StoreUnavailable

__all__ = ["Store", "StoreConfigError", "StoreError", "StoreUnavailable", "describe_url", "open_store"]


def describe_url(url: str) -> str:
    """scheme://host[:port] with no user or password, for error lines and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.scheme.startswith("sqlite"):
        return f"{parts.scheme}://{parts.path}"
    return f"{parts.scheme}://{host}"


def open_store(url: str) -> Store:
    """Create the Store for ``url``. Does no I/O; call ``migrate()`` / ``ping()`` next."""
    scheme = urlsplit(url).scheme.split("+")[0].lower()
    if scheme == "memory":
        from modelfleet.store.memory import MemoryStore

        return MemoryStore()
    if scheme in ("sqlite", "postgresql", "postgres", "mysql", "mariadb"):
        from modelfleet.store.sql import SQLStore

        return SQLStore(url)
    if scheme in ("redis", "rediss"):
        from modelfleet.store.redis import RedisStore

        return RedisStore(url)
    raise StoreConfigError(f"unknown store URL scheme {scheme!r} in {describe_url(url)}")
