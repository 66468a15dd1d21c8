"""Scale to zero and back with the bundled chat model (llama.cpp), and a worker's SIGTERM
that drains its instance first: real controller, worker, runner and gateway.

- the model, scaled to zero after idle_after, stays listed; the next request is held while
  the runner loads and is served, no 503; its first-token time is printed against the
  model's load time (docs/autoscaling.md has the figures);
- SIGTERM of the worker during a streamed answer: the answer completes (the worker takes the
  instance out of rotation and waits until the gateway reports it idle before stopping it).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, require_modules
from tests.gateway.conftest import ADMIN, JOIN, PY
from tests.support.procs import Procs, wait_for

require_modules("llama_cpp", hint="the llama.cpp backend: make install")

pytestmark = pytest.mark.timeout(400)
CHAT = "smollm2-135m-instruct"
H = {"authorization": f"Bearer {ADMIN}"}


def models(ctl: str) -> dict[str, Any]:
    data = httpx.get(f"{ctl}/v1/cluster/models", headers=H, timeout=10).json()["data"]
    return next((m for m in data if m["name"] == CHAT), {})


def first_token(gw: str, body: dict[str, Any]) -> tuple[int, float, bytes]:
    t0 = time.perf_counter()
    first = None
    data = b""
    with httpx.stream("POST", f"{gw}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        for chunk in r.iter_bytes():
            first = first or time.perf_counter() - t0
            data += chunk
        return r.status_code, first or 0.0, data


@pytest.fixture
def rig(procs: Procs, tmp_path: Any) -> dict[str, Any]:
    cport, gport = free_port(), free_port()
    ctl, gw = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{gport}"
    home = {"MODELFLEET_HOME": str(tmp_path / "home")}
    procs.controller(
        "ctl",
        cport,
        f"sqlite:///{tmp_path / 'state.db'}",
        "--admin-token",
        ADMIN,
        "--join-token",
        JOIN,
        "--heartbeat-interval",
        "1",
        "--load-report-ttl",
        "3",
        "--lease-ttl",
        "3",
    )
    worker = procs.worker(
        "w1",
        free_port(),
        ctl,
        "--join-token",
        JOIN,
        "--heartbeat-interval",
        "1",
        "--runner-port-start",
        str(free_port()),
        "--drain-timeout",
        "120",
        env=home,
    )
    worker.wait_ready(60)
    procs.start(
        "gw",
        [
            PY,
            "-m",
            "modelfleet.gateway",
            "--controller",
            ctl,
            "--port",
            str(gport),
            "--host",
            "127.0.0.1",
            "--admin-token",
            ADMIN,
            "--snapshot-path",
            "",
            "--poll-wait-s",
            "5",
        ],
        env=home,
        ready_url=f"{gw}/health/live",
    ).wait_ready(60)
    return {"ctl": ctl, "gw": gw, "worker": worker}


def test_scale_to_zero_then_the_next_request_is_held_and_served(rig: dict[str, Any]) -> None:
    ctl, gw = rig["ctl"], rig["gw"]
    t0 = time.monotonic()
    r = httpx.post(
        f"{ctl}/v1/cluster/deployments",
        headers=H,
        timeout=30,
        json={
            "name": CHAT,
            "backend": "llama.cpp",
            "source": CHAT,
            "max_concurrency": 2,
            "autoscale": {"min_replicas": 0, "max_replicas": 1, "idle_after_s": 4, "target_ongoing": 2},
        },
    )
    assert r.status_code == 201, r.text
    wait_for(lambda: models(ctl).get("ready") == 1, 180, what="the replica ready")
    load_s = time.monotonic() - t0
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    status, warm, _ = first_token(gw, body)
    assert status == 200
    wait_for(lambda: models(ctl).get("instances") == 0, 60, what="scaled to zero")
    assert [m["id"] for m in httpx.get(f"{gw}/v1/models", timeout=5).json()["data"]] == [CHAT]
    status, cold, data = first_token(gw, body)
    assert status == 200, data[:500]
    assert b"[DONE]" in data
    print(
        f"\nbundled {CHAT}: load (deploy to ready) {load_s:.2f} s; first token warm {warm:.3f} s, "
        f"from zero {cold:.2f} s"
    )


def test_worker_sigterm_drains_its_instance_before_stopping_it(rig: dict[str, Any]) -> None:
    ctl, gw = rig["ctl"], rig["gw"]
    r = httpx.post(
        f"{ctl}/v1/cluster/deployments",
        headers=H,
        timeout=30,
        json={"name": CHAT, "backend": "llama.cpp", "source": CHAT, "max_concurrency": 2, "replicas": 1},
    )
    assert r.status_code == 201, r.text
    wait_for(lambda: models(ctl).get("ready") == 1, 180, what="the replica ready")
    body = {
        "model": CHAT,
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 300, one number per line."}],
    }
    out: dict[str, Any] = {}
    started = threading.Event()

    def stream() -> None:
        data = b""
        with httpx.stream("POST", f"{gw}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
            out["status"] = r.status_code
            for chunk in r.iter_bytes():
                data += chunk
                started.set()
        out["data"] = data

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(60)
    rig["worker"].popen.send_signal(signal.SIGTERM)
    t.join(120)
    data = out.get("data", b"")
    assert out.get("status") == 200
    assert b"[DONE]" in data and b"upstream_stream_broken" not in data, data[-500:]
    rig["worker"].popen.wait(60)
    log = rig["worker"].log_path.read_text()
    assert "draining 1 instance(s) before stopping" in log and "idle at every gateway" in log, log[-2000:]
