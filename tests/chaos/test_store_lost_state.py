"""A store that loses its state never opens the door (issue 9, section 2).

A Redis without persistence (a private server) is restarted under a running controller and
gateway: everything in it is gone. The controller detects it (cluster identity), says so
(log, /health/ready, metric) and refuses to serve from it; the gateway keeps its last good
table, so requests with the key go on being served and requests without one are refused,
also by a gateway restarted from its snapshot. The operator then accepts the new store
(`modelfleet store accept`): keys stay required until `modelfleet keys open`."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.chaos.matrix import stop_together
from tests.gateway.conftest import ADMIN, Cluster, admin_h
from tests.gateway.load import chat_body, run_load
from tests.gateway.test_gw_failures import until
from tests.support.procs import MODELFLEET, Procs
from tests.support.stores import private_store_or_skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELFLEET, *args], capture_output=True, text=True, timeout=60)


def chat_status(cluster: Cluster, key: str | None = None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{cluster.gateway_url}/v1/chat/completions", json=chat_body(), headers=headers, timeout=10
    ).status_code


def create_key(ctl: str) -> str:
    return httpx.post(f"{ctl}/v1/cluster/keys", json={"name": "ci"}, headers=admin_h(), timeout=5).json()["key"]


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=5).text


def controller_ready(ctl: str) -> tuple[int, dict]:
    r = httpx.get(f"{ctl}/health/ready", timeout=5)
    return r.status_code, r.json()


@pytest.mark.timeout(150)
async def test_redis_without_persistence_restarted_keeps_keys_required(procs: Procs, tmp_path: Path) -> None:
    server = private_store_or_skip("redis", False)
    cluster = Cluster(procs, tmp_path)
    try:
        cluster.store = server.url
        ctl = cluster.controller(None, "--allow-volatile-store")
        worker = cluster.start_worker()
        for name in ("a", "b"):
            worker.declare(f"w1/{name}", "m", cluster.upstream(name, "--latency", "0.02"))
        key = create_key(ctl)
        old_id = controller_ready(ctl)[1]["cluster_id"]
        cluster.gateway()
        cluster.wait_routable("m", 2)
        await until(lambda: chat_status(cluster) == 401, 10, "the gateway to require the key")

        url = f"{cluster.gateway_url}/v1/chat/completions"
        stop = asyncio.Event()
        keyed = asyncio.create_task(run_load(url, 10**7, 4, chat_body(), {"authorization": f"Bearer {key}"}, stop=stop))
        anonymous = asyncio.create_task(run_load(url, 10**7, 2, chat_body(), stop=stop))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)  # empty: no RDB, no AOF

        await until(lambda: controller_ready(ctl)[1]["store_state_lost"], 10, "the controller to see the loss")
        status, body = controller_ready(ctl)
        assert status == 503 and "lost its state" in body["reason"] and body["cluster_id"] == old_id
        assert "modelfleet_controller_store_state_lost 1.0" in await asyncio.to_thread(metrics, ctl)
        assert "STORE STATE LOST" in cluster.controllers[0][0].log_tail(100)
        # Nothing was re-created in the lost store behind the operator's back.
        import redis

        with redis.Redis(host="127.0.0.1", port=server.port) as r:
            assert r.keys("*") == []
        await asyncio.sleep(3.0)  # the gateway goes on serving from its last good table
        stop.set()
        with_key, without_key = await keyed, await anonymous
        print(
            f"\nwith the key: {len(with_key.outcomes)} sent, {len(with_key.failed)} failed; "
            f"without: {len(without_key.outcomes)} sent, statuses {sorted({o.status for o in without_key.outcomes})}"
        )
        assert len(with_key.outcomes) > 100 and with_key.failed == [], with_key.failed[:3]
        assert without_key.outcomes and {o.status for o in without_key.outcomes} == {401}

        # A gateway restarted now serves from its snapshot and still knows keys were required.
        await asyncio.to_thread(cluster.restart_gateway)
        assert cluster.status()["route_table"]["state"] == "stale"
        assert chat_status(cluster, key) == 200 and chat_status(cluster) == 401

        # The operator accepts the new, empty store: keys stay required (and the old key is gone).
        out = cli("store", "accept", "--controller", ctl, "--admin-token", ADMIN, "--json")
        assert out.returncode == 0, out.stderr
        accepted = json.loads(out.stdout)
        assert accepted["accepted"] and accepted["replaces"] == [old_id] and accepted["auth"] == "required"
        await until(lambda: controller_ready(ctl)[0] == 200, 10, "the controller ready on the new store")
        assert controller_ready(ctl)[1]["cluster_id"] == accepted["cluster_id"] != old_id
        cluster.wait_routable("m", 2)  # the worker registered again and declared its instances
        await until(lambda: "replaced by cluster" in cluster.log_tail(), 10, "the gateway to take the new cluster")
        assert chat_status(cluster) == 401 and chat_status(cluster, key) == 401

        # Opening inference is an explicit, logged act.
        out = cli("keys", "open", "--controller", ctl, "--admin-token", ADMIN)
        assert out.returncode == 0, out.stderr
        await until(lambda: chat_status(cluster) == 200, 10, "inference open after `keys open`")
        assert "inference OPENED by an admin" in cluster.controllers[0][0].log_tail(100)
    finally:
        if cluster.worker is not None:
            cluster.worker.stop()
        stop_together([p.stop for p in procs.all] + [server.destroy])
