"""Store fixtures: every contract test runs against memory, SQLite, PostgreSQL, MariaDB and Redis.

The SQL and Redis backends use the private database / key prefix fixtures from
tests/conftest.py (a server that is not running skips, or fails in CI)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from modelfleet.store import Store, open_store
from modelfleet.store.memory import MemoryStore

BACKENDS = ["memory", "sqlite", "postgresql", "mysql", "redis"]
_URL_FIXTURE = {"sqlite": "sqlite_url", "postgresql": "pg_url", "mysql": "mysql_url", "redis": "redis_url"}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "memory":
        return "memory://"
    return request.getfixturevalue(_URL_FIXTURE[backend])


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[Callable[[], Store]]:
    """Opens Store objects on the test's backend; each one stands for a controller process.

    memory:// is one process by definition, so its "controllers" are the same MemoryStore
    object: the two-controller tests then check concurrency within one event loop only."""
    opened: list[Store] = []
    memory: MemoryStore | None = None

    def make() -> Store:
        nonlocal memory
        if store_url == "memory://":
            if memory is None:
                memory = MemoryStore()
                opened.append(memory)
            return memory
        s = open_store(store_url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> Store:
    s = make_store()
    await s.migrate()
    return s


@pytest.fixture
async def two_stores(make_store: Callable[[], Store]) -> tuple[Store, Store]:
    """Two controllers on one backend, both migrated."""
    a, b = make_store(), make_store()
    await a.migrate()
    await b.migrate()
    return a, b
