"""Two workers on two hosts (network namespaces) serving a 2-replica deployment of the bundled
chat model, behind a real gateway. Cut one host: its replica moves within grace + one
interval and the gateway answers throughout. Bring it back: its stale runner stops. Cut
both: the panic hold keeps the replicas where they are."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.support.netns import netlab_or_skip
from tests.support.procs import MODELFLEET, wait_for

INTERVAL, GRACE = 1.0, 8.0


def instances(controller: str) -> list[dict]:
    return httpx.get(f"{controller}/v1/cluster/instances", params={"model": "chat"}, timeout=5).json()["data"]


class Load:
    """Sequential chat requests through the gateway, recording every failure."""

    def __init__(self, gateway: str) -> None:
        self.gateway, self.ok, self.failures = gateway, 0, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(f"{self.gateway}/v1/chat/completions", json={
                        "model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                    if r.status_code == 200 and r.json()["choices"]:
                        self.ok += 1
                    else:
                        self.failures.append((time.monotonic(), r.status_code, r.text[:200]))
                except httpx.HTTPError as exc:
                    self.failures.append((time.monotonic(), 0, repr(exc)))
                time.sleep(0.05)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(70)


@pytest.mark.timeout(420)
def test_cut_worker_replica_moves_gateway_answers_panic_holds(procs, tmp_path, sqlite_url):
    lab = netlab_or_skip()
    try:
        ns_a, ip_a = lab.add_host("a")
        ns_b, ip_b = lab.add_host("b")
        cport = free_port()
        controller = f"http://{lab.gateway_ip}:{cport}"
        ctl = procs.controller("ctl", cport, sqlite_url, "--heartbeat-interval", str(INTERVAL), "--grace",
                               str(GRACE), host=lab.gateway_ip)
        for name, ns, ip in (("a", ns_a, ip_a), ("b", ns_b, ip_b)):
            procs.worker(name, 8200, controller, "--heartbeat-interval", str(INTERVAL), netns=ns, host="0.0.0.0",
                         address=ip).wait_ready(60)
        gport = free_port()
        gateway = f"http://127.0.0.1:{gport}"
        procs.start("gateway", [*MODELFLEET, "gateway", "--controller", controller, "--host", "127.0.0.1",
                                "--port", str(gport), "--snapshot-path", str(tmp_path / "routes.json")],
                    ready_url=f"{gateway}/health/live").wait_ready(60)

        r = httpx.post(f"{controller}/v1/cluster/deployments", json={
            "name": "chat", "backend": "llama.cpp", "source": "smollm2-135m-instruct", "replicas": 2,
            "max_concurrency": 2})
        assert r.status_code == 201, r.text
        ready = wait_for(lambda: (i := instances(controller)) and len(i) == 2
                         and all(x["state"] == "ready" for x in i) and i, 180, what="2 ready replicas")
        assert sorted(x["worker_id"] for x in ready) == ["a", "b"]  # spread
        wait_for(lambda: httpx.post(f"{gateway}/v1/chat/completions", timeout=30, json={
            "model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200,
            30, what="gateway serving chat")
        on_a = next(x["id"] for x in ready if x["worker_id"] == "a")

        with Load(gateway) as load:
            time.sleep(2)
            lab.cut("a")
            cut_at = time.monotonic()
            wait_for(lambda: sorted(x["worker_id"] for x in instances(controller)) == ["b", "b"], GRACE + 10,
                     interval=0.1, what="replica re-placed on b")
            moved_after = time.monotonic() - cut_at
            wait_for(lambda: all(x["state"] == "ready" for x in instances(controller)), 120,
                     what="moved replica ready")
            time.sleep(2)
        assert moved_after <= GRACE + INTERVAL + 0.5, f"re-placed {moved_after:.1f}s after the cut"
        assert on_a not in {x["id"] for x in instances(controller)}
        assert load.ok > 20
        assert load.failures == [], f"gateway failed {len(load.failures)} requests: {load.failures[:3]}"

        # The dead worker comes back: its stale runner is stopped, nothing counted twice.
        lab.restore("a")
        wait_for(lambda: httpx.get(f"http://{ip_a}:8200/v1/instances", timeout=5).json()["data"] == [], 30,
                 what="stale instance stopped on a")
        assert len(instances(controller)) == 2

        # Both hosts cut at once: a network fault, not dead machines. Nothing moves.
        before = sorted((x["id"], x["worker_id"]) for x in instances(controller))
        lab.cut("a")
        lab.cut("b")
        time.sleep(GRACE + 4 * INTERVAL)
        assert sorted((x["id"], x["worker_id"]) for x in instances(controller)) == before
        assert "holding moves" in ctl.log_tail(300)
        assert "modelfleet_reconciler_held 1.0" in httpx.get(f"{controller}/metrics").text
    finally:
        procs.stop_all()
        lab.destroy()
