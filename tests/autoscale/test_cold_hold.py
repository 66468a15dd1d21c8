"""Held, not refused (issue 12 §2), on real processes: a controller, a scripted upstream
declared by a fake worker, the gateway as a subprocess.

A model that is listed but has no ready instance holds requests until one is ready; past the
bound the answer is 503 with Retry-After; a request that reaches a gateway before its first
route table is held too."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.gateway.conftest import Cluster, admin_h
from tests.support.procs import wait_for

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def set_state(cluster: Cluster, instance_id: str, state: str) -> None:
    w = cluster.worker
    assert w is not None
    with w._lock:
        w.instances[instance_id]["state"] = state
        w._changed = True


def post_in_thread(url: str, out: dict[str, Any], timeout: float = 60.0) -> threading.Thread:
    def run() -> None:
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=timeout)
            out.update(status=r.status_code, body=r.text, headers=dict(r.headers))
        except httpx.HTTPError as exc:
            out.update(status=None, error=repr(exc))
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def queued(cluster: Cluster, model: str = "m") -> int:
    for m in cluster.status()["models"]:
        if m["name"] == model:
            return int(m["queued"])
    return 0


def test_request_for_a_starting_model_is_held_and_served(cluster: Cluster) -> None:
    cluster.controller()
    url = cluster.upstream("a")
    w = cluster.start_worker()
    w.declare("w1/a", "m", url)
    set_state(cluster, "w1/a", "starting")
    gw = cluster.gateway()
    wait_for(lambda: any(m["name"] == "m" for m in cluster.status()["models"]), 15, what="model m listed")
    assert httpx.get(f"{gw}/v1/models", timeout=5).json()["data"][0]["id"] == "m"

    out: dict[str, Any] = {}
    t = post_in_thread(gw, out)
    # Held in the model's queue (what the gateway reports as load), not answered.
    wait_for(lambda: queued(cluster) == 1, 15, what="the request held in m's queue")
    assert "status" not in out
    set_state(cluster, "w1/a", "ready")
    t.join(30)
    assert out.get("status") == 200, (out, cluster.log_tail())
    assert out["headers"]["x-modelfleet-instance"] == "w1/a"
    assert cluster.upstream_stats("a")["completed"] == 1


def test_held_past_the_bound_is_503_with_retry_after(cluster: Cluster) -> None:
    cluster.controller()
    url = cluster.upstream("a")
    w = cluster.start_worker()
    w.declare("w1/a", "m", url)
    set_state(cluster, "w1/a", "starting")
    gw = cluster.gateway("--cold-start-wait-s", "1.5")
    wait_for(lambda: any(m["name"] == "m" for m in cluster.status()["models"]), 15, what="model m listed")
    t0 = time.monotonic()
    r = httpx.post(f"{gw}/v1/chat/completions", json=BODY, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "no_healthy_instance"
    assert "became ready within 1.5 s" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert elapsed >= 1.4


def test_request_during_a_model_restart_is_held(cluster: Cluster) -> None:
    cluster.controller()
    url = cluster.upstream("a")
    w = cluster.start_worker()
    w.declare("w1/a", "m", url)
    gw = cluster.gateway()
    cluster.wait_routable("m", 1)
    assert httpx.post(f"{gw}/v1/chat/completions", json=BODY, timeout=10).status_code == 200
    set_state(cluster, "w1/a", "starting")  # the runner restarts
    cluster.wait_routable("m", 0)
    out: dict[str, Any] = {}
    t = post_in_thread(gw, out)
    wait_for(lambda: queued(cluster) == 1, 15, what="the request held in m's queue")
    set_state(cluster, "w1/a", "ready")
    t.join(30)
    assert out.get("status") == 200, (out, cluster.log_tail())


def test_request_before_the_gateways_first_route_table_is_held(cluster: Cluster) -> None:
    # The store knows model m (a ready instance); then the controller goes away, and a gateway
    # starts with no snapshot: it has no route table at all.
    ctl = cluster.controller()
    url = cluster.upstream("a")
    cluster.start_worker().declare("w1/a", "m", url)
    wait_for(
        lambda: any(
            m["name"] == "m" and m["ready"] == 1
            for m in httpx.get(f"{ctl}/v1/cluster/models", headers=admin_h(), timeout=5).json()["data"]
        ),
        15,
        what="m ready in the store",
    )
    cluster.kill_controller(0)
    gw = cluster.gateway("--snapshot-path", "", wait_ready=False)
    assert cluster.gateway_proc is not None
    cluster.gateway_proc.wait_ready(30, url=f"{gw}/health/live")
    assert httpx.get(f"{gw}/health/ready", timeout=5).status_code == 503
    out: dict[str, Any] = {}
    t = post_in_thread(gw, out)
    time.sleep(1.5)  # the request is in, and there is no route table: nothing may answer it yet
    assert "status" not in out, out
    cluster.restart_controller(0)
    t.join(60)
    assert out.get("status") == 200, (out, cluster.log_tail())
    assert out["elapsed"] >= 1.5
    # An unknown model is still a 404 once the table is there.
    r = httpx.post(f"{gw}/v1/chat/completions", json={**BODY, "model": "nope"}, timeout=10)
    assert r.status_code == 404
