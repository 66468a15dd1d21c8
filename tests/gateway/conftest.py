"""A real cluster for gateway tests: controller subprocesses on a SQLite store, scripted
upstreams as subprocesses (so kill -9 is real), a fake worker that heartbeats their
instances over HTTP, and the gateway itself as a subprocess (`python -m modelfleet.gateway`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.support.procs import Proc, Procs, wait_for

ROOT = Path(__file__).resolve().parents[2]
ADMIN, JOIN = "gw-admin-secret", "gw-join-secret"
PY = sys.executable
HEARTBEAT_S = 0.5


def admin_h() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


class FakeWorker:
    """Declares instances (scripted upstreams) to the controllers, as a worker agent would:
    one heartbeat per interval to the first controller that answers."""

    def __init__(self, controllers: list[str], worker_id: str = "w1", interval: float = HEARTBEAT_S) -> None:
        self.controllers = controllers
        self.id = worker_id
        self.interval = interval
        self.instances: dict[str, dict[str, Any]] = {}
        self._changed = True
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"fake-worker-{worker_id}")
        self.beats = 0
        self.paused = threading.Event()  # set: no heartbeats (a worker cut off, or slow to return)

    def declare(self, instance_id: str, model: str, endpoint: str, max_concurrency: int = 64) -> None:
        with self._lock:
            self.instances[instance_id] = {
                "id": instance_id, "declared": True, "state": "ready", "endpoint": endpoint, "model": model,
                "backend": "openai", "source": endpoint, "max_concurrency": max_concurrency,
            }
            self._changed = True

    def remove(self, instance_id: str) -> None:
        with self._lock:
            self.instances.pop(instance_id, None)
            self._changed = True

    def start(self) -> FakeWorker:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        with httpx.Client(timeout=self.interval * 2) as client:
            while not self._stop.is_set():
                if self.paused.is_set():
                    self._stop.wait(0.05)
                    continue
                with self._lock:
                    statuses = list(self.instances.values()) if self._changed else None
                    self._changed = False
                body = {"worker": {"id": self.id, "name": self.id, "address": "127.0.0.1", "port": 1},
                        "instances": statuses}
                sent = False
                for base in self.controllers:
                    try:
                        r = client.post(f"{base}/v1/cluster/heartbeat", json=body,
                                        headers={"authorization": f"Bearer {JOIN}"})
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200:
                        sent = True
                        self.beats += 1
                        if r.json().get("registered"):
                            with self._lock:
                                self._changed = True  # a fresh row: report the instances again
                        break
                if not sent and statuses is not None:
                    with self._lock:
                        self._changed = True
                self._stop.wait(self.interval)


class Cluster:
    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs = procs
        self.tmp = tmp
        self.store = f"sqlite:///{tmp / 'state.db'}"
        self.controllers: list[tuple[Proc, str]] = []
        self.upstreams: dict[str, tuple[Proc, str]] = {}
        self.worker: FakeWorker | None = None
        self.gateway_proc: Proc | None = None
        self.gateway_url = ""
        self.gateway_args: list[str] = []

    # -- pieces
    def controller(self, port: int | None = None, *extra: str) -> str:
        port = port or free_port()
        name = f"ctl-{port}"
        p = self.procs.controller(name, port, self.store, "--admin-token", ADMIN, "--join-token", JOIN,
                                  "--heartbeat-interval", str(HEARTBEAT_S), *extra)
        url = f"http://127.0.0.1:{port}"
        self.controllers.append((p, url))
        return url

    def kill_controller(self, index: int) -> None:
        self.controllers[index][0].kill()

    def restart_controller(self, index: int) -> None:
        """A new controller process on the same port and store."""
        old, url = self.controllers[index]
        old.kill()
        port = int(url.rsplit(":", 1)[1])
        p = self.procs.controller(f"ctl-{port}-{len(self.procs.all)}", port, self.store, "--admin-token", ADMIN,
                                  "--join-token", JOIN, "--heartbeat-interval", str(HEARTBEAT_S))
        self.controllers[index] = (p, url)

    @property
    def controller_urls(self) -> list[str]:
        return [u for _, u in self.controllers]

    def upstream(self, name: str, *args: str, port: int | None = None) -> str:
        port = port or free_port()
        p = self.procs.start(f"up-{name}", [PY, "-m", "tests.fakes.scripted_upstream", "--port", str(port),
                                            "--name", name, *args],
                             env={"PYTHONPATH": str(ROOT)}, ready_url=f"http://127.0.0.1:{port}/health")
        p.wait_ready(30)
        url = f"http://127.0.0.1:{port}"
        self.upstreams[name] = (p, url)
        return url

    def start_worker(self) -> FakeWorker:
        self.worker = FakeWorker(self.controller_urls).start()
        return self.worker

    def gateway(self, *args: str, port: int | None = None, wait_ready: bool = True) -> str:
        port = port or free_port()
        self.gateway_args = [
            "--controller", ",".join(self.controller_urls), "--port", str(port), "--host", "127.0.0.1",
            "--admin-token", ADMIN, "--snapshot-path", str(self.tmp / "gateway-routes.json"),
            "--poll-wait-s", "5", "--eject-cooldown-s", "1", "--log-level", "debug", *args,
        ]
        self.gateway_proc = self.procs.start(f"gw-{port}", [PY, "-m", "modelfleet.gateway", *self.gateway_args],
                                             ready_url=f"http://127.0.0.1:{port}/health/ready")
        self.gateway_url = f"http://127.0.0.1:{port}"
        if wait_ready:
            self.gateway_proc.wait_ready(30)
        return self.gateway_url

    def restart_gateway(self) -> None:
        assert self.gateway_proc is not None
        self.gateway_proc.kill()
        self.gateway_proc = self.procs.start(f"gw-restart-{len(self.procs.all)}",
                                             [PY, "-m", "modelfleet.gateway", *self.gateway_args],
                                             ready_url=f"{self.gateway_url}/health/ready")
        self.gateway_proc.wait_ready(30)

    # -- observations
    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.gateway_url}/v1/gateway/status", headers=admin_h(), timeout=5).json()

    def instance_view(self, instance_id: str) -> dict[str, Any] | None:
        for m in self.status()["models"]:
            for i in m["instances"]:
                if i["id"] == instance_id:
                    return i
        return None

    def wait_routable(self, model: str, count: int, timeout: float = 15.0) -> None:
        def ok() -> bool:
            for m in self.status()["models"]:
                if m["name"] == model:
                    return sum(1 for i in m["instances"] if i["enabled"]) == count
            return False

        wait_for(ok, timeout, what=f"{count} routable instance(s) of {model} in the gateway")

    def upstream_stats(self, name: str) -> dict[str, Any]:
        return httpx.get(f"{self.upstreams[name][1]}/_stats", timeout=5).json()

    def control(self, name: str, **script: Any) -> None:
        r = httpx.post(f"{self.upstreams[name][1]}/_control", json=script, timeout=5)
        assert r.status_code == 200, r.text

    def log_tail(self) -> str:
        return self.gateway_proc.log_tail(60) if self.gateway_proc else ""


@pytest.fixture
def cluster(procs: Procs, tmp_path: Path) -> Iterator[Cluster]:
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    c = Cluster(procs, tmp_path)
    yield c
    if c.worker is not None:
        c.worker.stop()


def two_instance_cluster(cluster: Cluster, model: str = "m", *gateway_args: str, upstream_args: tuple[str, ...] = (),
                         max_concurrency: int = 64) -> Cluster:
    """One controller, instances a and b of ``model``, a gateway; waits until both route."""
    cluster.controller()
    for name in ("a", "b"):
        url = cluster.upstream(name, *upstream_args)
        if cluster.worker is None:
            cluster.start_worker()
        assert cluster.worker is not None
        cluster.worker.declare(f"w1/{name}", model, url, max_concurrency=max_concurrency)
    cluster.gateway(*gateway_args)
    cluster.wait_routable(model, 2)
    return cluster
