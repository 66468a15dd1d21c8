"""Control-plane failures on real processes: a controller killed, the leader killed, the store restarted."""

from __future__ import annotations

import signal
import sys
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.support.procs import wait_for

INTERVAL = 2.0


def workers_through(ctl: str) -> list[dict]:
    return httpx.get(f"{ctl}/v1/cluster/workers", timeout=5).json()["data"]


def many_workers(procs, controllers: str, count: int, prefix: str = "w", interval: float = INTERVAL):
    p = procs.start(f"workers-{prefix}", [sys.executable, "-m", "tests.support.many_workers", "--controller",
                                          controllers, "--count", str(count), "--prefix", prefix,
                                          "--interval", str(interval)])
    return p


def test_kill_one_of_two_controllers_with_50_workers(procs, pg_url):
    """Workers list A first; A dies by kill -9; every worker is healthy through B within 2
    intervals and no worker is duplicated."""
    pa, pb = free_port(), free_port()
    a = procs.controller("ctl-a", pa, pg_url, "--heartbeat-interval", str(INTERVAL))
    procs.controller("ctl-b", pb, pg_url, "--heartbeat-interval", str(INTERVAL))
    ca, cb = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    many_workers(procs, f"{ca},{cb}", 50)
    wait_for(lambda: len([w for w in workers_through(cb) if w["alive"]]) == 50, 60, what="50 workers alive")

    a.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    # Within 2 intervals every worker has heartbeated through B after the kill.
    time.sleep(2 * INTERVAL)
    ws = workers_through(cb)
    assert len(ws) == 50 and len({w["id"] for w in ws}) == 50
    stale = [w["id"] for w in ws if w["heartbeat_age"] > time.monotonic() - killed_at]
    assert stale == [], f"workers with no heartbeat since the kill: {stale}"
    assert all(w["alive"] for w in ws)
    # …and they stay healthy.
    time.sleep(INTERVAL * 2)
    assert all(w["alive"] for w in workers_through(cb))


def test_lease_moves_after_leader_is_killed(procs, pg_url):
    ttl = 3.0
    ports = [free_port(), free_port()]
    ctls = {port: procs.controller(f"ctl-{port}", port, pg_url, "--lease-ttl", str(ttl)) for port in ports}

    def leader_info():
        for port in ports:
            if ctls[port].popen.poll() is None:
                info = httpx.get(f"http://127.0.0.1:{port}/v1/cluster/leader", timeout=5).json()
                if info["lease"]:
                    return info
        return None

    first = wait_for(leader_info, 20, what="a leader")
    holder = first["lease"]["holder"]
    leader_port = next(p for p in ports if httpx.get(f"http://127.0.0.1:{p}/v1/cluster/leader",
                                                      timeout=5).json()["this_is_leader"])
    other = next(p for p in ports if p != leader_port)
    ctls[leader_port].kill(signal.SIGKILL)
    t0 = time.monotonic()
    second = wait_for(lambda: (i := httpx.get(f"http://127.0.0.1:{other}/v1/cluster/leader", timeout=5).json())
                      ["this_is_leader"] and i, ttl * 3, what="the other controller to lead")
    took = time.monotonic() - t0
    assert second["lease"]["holder"] != holder
    assert second["lease"]["token"] > first["lease"]["token"]  # fencing token only grows
    assert took < ttl + ttl / 3 + 1.0, f"handover took {took:.1f}s"
    log = ctls[other].log_tail(200)
    assert "became leader" in log


@pytest.mark.timeout(240)
def test_store_restart_loses_nothing(procs, tmp_path):
    from tests.support.pgserver import private_postgres_or_skip

    pg = private_postgres_or_skip()
    try:
        pa, pb = free_port(), free_port()
        procs.controller("ctl-a", pa, pg.url, "--heartbeat-interval", "1")
        procs.controller("ctl-b", pb, pg.url, "--heartbeat-interval", "1")
        ca, cb = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
        wport = free_port()
        worker = procs.worker("real-worker", wport, f"{ca},{cb}", "--heartbeat-interval", "1",
                              "--runner-port-start", str(free_port()))
        worker.wait_ready(60)
        many_workers(procs, f"{cb},{ca}", 10, interval=1.0)
        r = httpx.post(f"{ca}/v1/cluster/deployments", json={"name": "kept", "backend": "openai",
                                                             "source": "http://127.0.0.1:9", "replicas": 0})
        assert r.status_code == 201
        wait_for(lambda: len([w for w in workers_through(ca) if w["alive"]]) == 11, 60, what="11 workers")

        pg.stop()
        for c in (ca, cb):
            wait_for(lambda c=c: httpx.get(f"{c}/health/ready", timeout=5).status_code == 503, 20,
                     what=f"{c} not ready")
        body = httpx.get(f"{ca}/health/ready", timeout=5).json()
        assert body["ready"] is False and body["reason"]
        hb = httpx.post(f"{ca}/v1/cluster/heartbeat", json={"worker": {"id": "x", "name": "x", "address": "h",
                                                                         "port": 1}}, timeout=10)
        assert hb.status_code == 503 and "store unavailable" in hb.json()["error"]["message"]
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{wport}/health/ready", timeout=5).status_code == 503,
                 20, what="worker to notice it is not registered")
        time.sleep(3)

        pg.start()
        for c in (ca, cb):
            wait_for(lambda c=c: httpx.get(f"{c}/health/ready", timeout=5).status_code == 200, 30,
                     what=f"{c} ready again")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{wport}/health/ready", timeout=5).status_code == 200,
                 30, what="worker registered again")
        ws = wait_for(lambda: (w := workers_through(cb)) and all(x["alive"] for x in w) and len(w) == 11 and w,
                      30, what="all 11 workers alive again")
        assert sorted(w["id"] for w in ws) == sorted(["real-worker", *[f"w{i:03d}" for i in range(10)]])
        deps = httpx.get(f"{cb}/v1/cluster/deployments", timeout=5).json()["data"]
        assert [d["name"] for d in deps] == ["kept"]
    finally:
        procs.stop_all()
        pg.destroy()


def test_worker_fails_over_and_registers_with_a_store_that_forgot_it(procs, tmp_path):
    """Two controllers on separate memory stores: the second has never heard of the worker.
    When the first dies, the worker moves within one interval and registers again by itself,
    reporting its instances."""
    pa, pb = free_port(), free_port()
    a = procs.controller("ctl-a", pa, "memory://", "--heartbeat-interval", "1")
    procs.controller("ctl-b", pb, "memory://", "--heartbeat-interval", "1")
    ca, cb = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    upstream_port = free_port()
    upstream = procs.start("upstream", [sys.executable, "-m", "tests.fakes.scripted_upstream", "--port",
                                        str(upstream_port)])
    wport = free_port()
    w = procs.worker("wk", wport, f"{ca},{cb}", "--heartbeat-interval", "1", "--model",
                     f"ext=openai:http://127.0.0.1:{upstream_port}", "--runner-port-start", str(free_port()))
    w.wait_ready(60)
    assert upstream.popen.poll() is None
    wait_for(lambda: [i["state"] for i in httpx.get(f"{ca}/v1/cluster/instances").json()["data"]] == ["ready"],
             30, what="declared instance ready through A")
    assert httpx.get(f"{cb}/v1/cluster/workers").json()["data"] == []
    a.kill(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: [x["id"] for x in httpx.get(f"{cb}/v1/cluster/workers").json()["data"]] == ["wk"], 5,
             what="worker registered with B")
    assert time.monotonic() - t0 < 2.5
    insts = wait_for(lambda: httpx.get(f"{cb}/v1/cluster/instances").json()["data"], 5, what="instances on B")
    assert [(i["id"], i["state"]) for i in insts] == [("wk/ext", "ready")]
    assert "switching to" in w.log_tail(100)
