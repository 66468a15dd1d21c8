"""Replicas follow the load (issue 12 §1, §3, §4) on real processes: a controller (SQLite), a
real worker agent, a gateway, and a scripted upstream that every replica attaches to
(backend ``openai``): the upstream gives the timing (fixed latency), the gateway enforces
each replica's max_concurrency, so a replica is one unit of capacity as in a real cluster.

- a burst scales the deployment up within the up delay plus a reconcile, and back down after
  the lull, with zero failed requests, the scale-down happening under load;
- scale to zero: the model stays listed, and the next request is held and served, no 503;
- a gateway that dies stops counting once its report's TTL has passed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import ADMIN, JOIN, PY, ROOT
from tests.support.procs import Proc, Procs, wait_for

pytestmark = pytest.mark.timeout(240)

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
H = {"authorization": f"Bearer {ADMIN}"}
REPORT_TTL = 3.0


@dataclass
class Rig:
    procs: Procs
    tmp: Path
    controller: str = ""
    upstream: str = ""
    gateway: str = ""
    gateway_proc: Proc | None = None
    worker_proc: Proc | None = None
    controller_proc: Proc | None = None

    def deploy(self, **policy: Any) -> None:
        body = {
            "name": "m",
            "backend": "openai",
            "source": self.upstream,
            "max_concurrency": 2,
            "replicas": 1,
            "autoscale": {
                "target_ongoing": 2,
                "window_s": 2,
                "up_delay_s": 1,
                "down_delay_s": 3,
                "max_step": 4,
                **policy,
            },
        }
        r = httpx.post(f"{self.controller}/v1/cluster/deployments", json=body, headers=H, timeout=10)
        assert r.status_code == 201, r.text

    def model(self) -> dict[str, Any]:
        data = httpx.get(f"{self.controller}/v1/cluster/models", headers=H, timeout=5).json()["data"]
        return next(m for m in data if m["name"] == "m")

    def routable(self) -> int:
        st = httpx.get(f"{self.gateway}/v1/gateway/status", headers=H, timeout=5).json()
        for m in st["models"]:
            if m["name"] == "m":
                return sum(1 for i in m["instances"] if i["enabled"])
        return 0

    def start_gateway(self, *extra: str) -> tuple[Proc, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        p = self.procs.start(
            f"gw-{port}",
            [
                PY,
                "-m",
                "modelfleet.gateway",
                "--controller",
                self.controller,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--admin-token",
                ADMIN,
                "--snapshot-path",
                "",
                "--poll-wait-s",
                "5",
                "--queue-wait-s",
                "30",
                "--cold-start-wait-s",
                "60",
                "--gateway-id",
                f"gw-{port}",
                *extra,
            ],
            ready_url=f"{url}/health/live",
        )
        p.wait_ready(30)
        return p, url


@pytest.fixture
def rig(procs: Procs, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(procs, tmp_path)
    port = free_port()
    r.controller_proc = procs.controller(
        "ctl",
        port,
        f"sqlite:///{tmp_path / 'state.db'}",
        "--admin-token",
        ADMIN,
        "--join-token",
        JOIN,
        "--heartbeat-interval",
        "0.5",
        "--drain-timeout",
        "20",
        "--load-report-ttl",
        str(REPORT_TTL),
        "--lease-ttl",
        "3",
    )
    r.controller = f"http://127.0.0.1:{port}"
    up = free_port()
    procs.start(
        "upstream",
        [PY, "-m", "tests.fakes.scripted_upstream", "--port", str(up), "--latency", "0.5"],
        env={"PYTHONPATH": str(ROOT)},
        ready_url=f"http://127.0.0.1:{up}/health",
    ).wait_ready(30)
    r.upstream = f"http://127.0.0.1:{up}"
    wport = free_port()
    r.worker_proc = procs.worker(
        "w1",
        wport,
        r.controller,
        "--join-token",
        JOIN,
        "--heartbeat-interval",
        "0.5",
        "--runner-port-start",
        str(free_port()),
        env={"MODELFLEET_HOME": str(tmp_path / "home")},
    )
    r.worker_proc.wait_ready(60)
    r.gateway_proc, r.gateway = r.start_gateway()
    yield r


@dataclass
class Load:
    """``clients`` threads, each sending one request after the other, counting statuses."""

    url: str
    clients: int
    statuses: Counter[int | str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for _ in range(self.clients):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=90) as c:
            while not self.stop.is_set():
                try:
                    status: int | str = c.post(f"{self.url}/v1/chat/completions", json=BODY).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self.lock:
                    self.statuses[status] += 1

    def end(self) -> Counter[int | str]:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return self.statuses


def test_burst_scales_up_then_down_after_the_lull_with_no_failed_request(rig: Rig) -> None:
    rig.deploy(min_replicas=1, max_replicas=4)
    wait_for(lambda: rig.routable() == 1, 60, what="one routable replica")
    # Burst: 8 clients against 1 replica of 2 slots (latency 0.5 s): load 8 = 4x the target.
    burst = Load(rig.gateway, 8).start()
    t0 = time.monotonic()
    wait_for(lambda: rig.model()["replicas"] == 4, 30, what="desired replicas 4")
    decided = time.monotonic() - t0
    wait_for(lambda: rig.routable() == 4, 30, what="4 routable replicas")
    ready_after = time.monotonic() - t0
    m = rig.model()
    assert "up 1 -> 4" in m["last_decision"]["reason"], m
    # Window 2 s, up delay 1 s, one decision a second: well under 10 s on a loaded machine.
    assert decided < 10, decided
    # The lull, under load: 2 clients keep requests in flight while 3 replicas are drained.
    statuses = burst.end()
    trickle = Load(rig.gateway, 2).start()
    wait_for(lambda: rig.model()["replicas"] == 1, 40, what="scaled back to 1")
    wait_for(lambda: rig.model()["instances"] == 1, 40, what="the drained replicas stopped")
    assert "down" in rig.model()["last_decision"]["reason"]
    statuses += trickle.end()
    # Each drained replica was stopped because every gateway reported it idle, not by the
    # drain timeout (20 s here), and never before the drain.
    assert rig.controller_proc is not None
    log = rig.controller_proc.log_path.read_text()
    drained = [line for line in log.splitlines() if " draining (no new requests" in line]
    removed = [line for line in log.splitlines() if " removed: drained" in line]
    assert len(drained) == 3 and len(removed) == 3, log[-3000:]
    assert all("idle at every gateway" in line for line in removed), removed
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 20
    print(f"burst: desired 4 after {decided:.1f} s, routable after {ready_after:.1f} s; {dict(statuses)}")


def test_scale_to_zero_keeps_the_model_listed_and_the_next_request_is_held_and_served(rig: Rig) -> None:
    rig.deploy(min_replicas=0, max_replicas=2, idle_after_s=3)
    wait_for(lambda: rig.routable() == 1, 60, what="one routable replica")
    assert httpx.post(f"{rig.gateway}/v1/chat/completions", json=BODY, timeout=30).status_code == 200
    wait_for(lambda: rig.model()["instances"] == 0, 40, what="scaled to zero")
    m = rig.model()
    assert m["replicas"] == 0 and "no request for" in m["last_decision"]["reason"]
    models = httpx.get(f"{rig.gateway}/v1/models", timeout=5).json()["data"]
    assert [x["id"] for x in models] == ["m"]  # still listed
    t0 = time.monotonic()
    r = httpx.post(f"{rig.gateway}/v1/chat/completions", json=BODY, timeout=90)
    first = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert rig.model()["replicas"] == 1
    print(f"first request after zero served in {first:.2f} s (upstream latency 0.5 s)")


def test_a_dead_gateways_load_report_stops_counting_within_its_ttl(rig: Rig) -> None:
    rig.deploy(min_replicas=1, max_replicas=2)
    wait_for(lambda: rig.routable() == 1, 60, what="one routable replica")
    gw2, url2 = rig.start_gateway()
    stuck = Load(url2, 4).start()

    def load_of(source_prefix: str) -> float | None:
        data = httpx.get(f"{rig.controller}/v1/cluster/load", headers=H, timeout=5).json()["data"]
        for r in data:
            if r["source"].startswith(source_prefix):
                m = r["models"].get("m", {})
                return m.get("in_flight", 0) + m.get("queued", 0)
        return None

    prefix = url2.rsplit(":", 1)[1]
    wait_for(lambda: (load_of(f"gw-{prefix}") or 0) > 0, 15, what="the second gateway reporting load")
    gw2.kill()  # kill -9: no goodbye
    killed = time.monotonic()
    wait_for(lambda: load_of(f"gw-{prefix}") is None, REPORT_TTL + 5, what="its report gone")
    gone = time.monotonic() - killed
    assert gone <= REPORT_TTL + 1.5, gone  # within its TTL (plus one report interval)
    assert load_of(f"gw-{rig.gateway.rsplit(':', 1)[1]}") is not None  # the live one still counts
    stuck.end()
