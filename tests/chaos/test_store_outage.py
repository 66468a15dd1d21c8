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
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import ADMIN, JOIN, PY, Cluster, FakeWorker
from tests.gateway.load import chat_body, run_load
from tests.gateway.test_gw_failures import until
from tests.support.procs import Procs
from tests.support.stores import PrivateStore, prepared_stores, private_store_or_skip

STORE_DOWN_S = float(os.environ.get("MODELFLEET_STORE_DOWN_S", "10"))
AFTER_S = 10.0
HEARTBEAT_S = 2.0  # the default: workers are dead after 6 s without a heartbeat


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_in_parallel(cluster: Cluster) -> None:
    """Two controllers on the cluster's store, two scripted instances and the worker declaring
    them: started together (each Python process takes seconds to start on a busy machine)."""
    ports = [free_port(), free_port()]
    controllers = [
        cluster.procs.controller(
            f"ctl-{p}",
            p,
            cluster.store,
            "--admin-token",
            ADMIN,
            "--join-token",
            JOIN,
            "--heartbeat-interval",
            str(HEARTBEAT_S),
            wait=False,
        )
        for p in ports
    ]
    upstreams = {}
    for name in ("a", "b"):
        port = free_port()
        upstreams[name] = cluster.procs.start(
            f"up-{name}",
            [PY, "-m", "tests.fakes.scripted_upstream", "--port", str(port), "--name", name, "--latency", "0.02"],
            ready_url=f"http://127.0.0.1:{port}/health",
        )
    for p, proc in zip(ports, controllers, strict=True):
        proc.wait_ready(60)
        cluster.controllers.append((proc, f"http://127.0.0.1:{p}"))
    worker = cluster.worker = FakeWorker(cluster.controller_urls, interval=HEARTBEAT_S).start()
    for name, proc in upstreams.items():
        proc.wait_ready(30)
        url = proc.ready_url.rsplit("/", 1)[0]
        cluster.upstreams[name] = (proc, url)
        worker.declare(f"w1/{name}", "m", url)


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
    server = private_store_or_skip(backend, prepared=servers[backend])
    cluster = Cluster(procs, tmp_path)
    try:
        cluster.store = server.url
        start_in_parallel(cluster)
        cluster.gateway()
        cluster.wait_routable("m", 2)

        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(f"{cluster.gateway_url}/v1/chat/completions", 10**7, 8, chat_body(), stop=stop)
        )
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.stop)
        down_at = time.monotonic()
        for url in cluster.controller_urls:
            await until(lambda url=url: not ready(url), 10, f"{url} to see the store gone")
        await asyncio.sleep(max(0.0, STORE_DOWN_S - (time.monotonic() - down_at)))
        await asyncio.to_thread(server.start)
        down_s = time.monotonic() - down_at
        for url in cluster.controller_urls:
            await until(lambda url=url: ready(url), 30, f"{url} ready again")
        await asyncio.sleep(AFTER_S)
        stop.set()
        result = await load
        failed = result.failed
        print(f"\n{backend}: store down {down_s:.1f} s; {len(result.outcomes)} requests sent, {len(failed)} failed")
        assert len(result.outcomes) > 200
        assert failed == [], (len(failed), failed[:3], cluster.log_tail())
        # Both instances served, and the gateway still routes to both after the outage.
        assert {"w1/a", "w1/b"} <= set(result.by_instance()), result.by_instance()
        cluster.wait_routable("m", 2)
    finally:
        if cluster.worker is not None:
            cluster.worker.stop()
        stop_together([p.stop for p in procs.all] + [server.destroy])


def stop_together(stops: list) -> None:
    """Teardown in parallel: each clean stop waits for its process."""
    threads = [threading.Thread(target=f) for f in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
