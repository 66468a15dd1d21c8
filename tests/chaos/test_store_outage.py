"""The store goes away under load and comes back: no request fails (issue 9, section 1).

Each backend runs on a private server the test starts (never the shared one): two real
controllers, a worker heartbeating two scripted instances, a real gateway, and a client with
8 requests in flight throughout. The store is stopped for STORE_DOWN_S, started again, and the
load goes on for AFTER_S. Before the fix, the moment the store answered again every worker
looked dead (their heartbeats could not be written while it was down) and the gateway answered
thousands of requests with 503 in the following second. Workers heartbeat at the default
interval (2 s): the window in which they looked dead after the store came back is that long."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests.chaos.matrix import Result, stop_together, store_outage
from tests.support.procs import Procs
from tests.support.stores import PrivateStore, prepared_stores, private_store_or_skip

STORE_DOWN_S = float(os.environ.get("MODELFLEET_STORE_DOWN_S", "10"))
AFTER_S = 10.0
BACKENDS = ["postgresql", "mariadb", "redis"]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Future[PrivateStore]]]:
    with prepared_stores(*BACKENDS) as futures:
        yield futures


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_store_restart_under_load_fails_no_request(
    backend: str, servers: dict[str, Future[PrivateStore]], procs: Procs, tmp_path: Path
) -> None:
    """The matrix's driver (tests/chaos/matrix.py, also run by `make chaos`)."""
    server = private_store_or_skip(backend, prepared=servers[backend])
    row = Result(f"store stopped and restarted ({backend})", "")
    try:
        result = await store_outage(procs, tmp_path, server, row, STORE_DOWN_S, AFTER_S)
    finally:
        await asyncio.to_thread(stop_together, [p.stop for p in procs.all] + [server.destroy])
    failed = result.failed
    print(
        f"\n{backend}: {len(result.outcomes)} requests sent, {len(failed)} failed; detect {row.detect_s} s, "
        f"recover {row.recover_s} s"
    )
    assert len(result.outcomes) > 200
    assert failed == [], (len(failed), failed[:3])
    # Both instances served, and the gateway still routes to both after the outage.
    assert row.checks == [], row.checks
