"""The HA layout of deploy/compose/compose.yaml, run for real with podman: PostgreSQL on a
named volume, two controllers, two workers (the cpu image), two gateways. Under load from a
real client that balances over both gateways (as a load balancer would: a refused
connection goes to the other one), on the bundled MiniLM (sentence-transformers, 2 replicas,
one per worker):

- kill -9 of a controller container: no request fails;
- PostgreSQL stopped, its container removed and created again from its volume: no request
  fails meanwhile, deployments and API keys are all there afterwards;
- kill -9 of a gateway container: only the requests in flight on it fail, the other one
  serves everything from then on (counted);
- kill -9 of a worker container that stays down: no request fails, its replica is placed on
  the other worker;
- the bundled SmolLM2 answers a chat completion on llama.cpp in the image;
- a graceful stop of each role ends within its grace period.

Select with `-m containers`. Figures are printed (pytest -s) and written to
build/container-test.json. The images are built once per set of inputs (deploy/docker/build.sh)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.deploy.podman import ROOT, ComposeProject, build_images, image_size_mb, podman, require_podman
from tests.support.procs import wait_for

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1500)]

MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
CONCURRENCY = 4
SERVICES = ("postgres", "controller-1", "controller-2", "worker-1", "worker-2", "gateway-1", "gateway-2")
FIGURES: dict[str, Any] = {}


@dataclass
class Result:
    start: float
    end: float
    gateway: int  # 0 or 1: the gateway that answered (or failed)
    ok: bool
    detail: str = ""
    failed_over: bool = False  # the first gateway refused the connection


@dataclass
class BalancedClient:
    """Chat completions from CONCURRENCY threads, alternating over the gateways; a refused
    connection (nothing was sent) goes to the other gateway, as a load balancer does."""

    gateways: list[str]
    key: str
    results: list[Result] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> BalancedClient:
        for i in range(CONCURRENCY):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def _run(self, index: int) -> None:
        body = {"model": MODEL, "input": f"request from thread {index}"}
        headers = {"authorization": f"Bearer {self.key}"}
        clients = [httpx.Client(base_url=g, headers=headers, timeout=60) for g in self.gateways]
        n = index
        while not self.stop.is_set():
            first = n % len(self.gateways)
            n += 1
            t0 = time.monotonic()
            result = None
            for attempt, gw in enumerate([first, 1 - first]):
                try:
                    r = clients[gw].post("/v1/embeddings", json=body)
                except httpx.ConnectError:
                    continue  # refused: nothing was sent, the other gateway takes it
                except httpx.HTTPError as exc:
                    result = Result(t0, time.monotonic(), gw, False, f"{type(exc).__name__}: {exc}"[:400], attempt > 0)
                    break
                ok = r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
                result = Result(
                    t0, time.monotonic(), gw, ok, "" if ok else f"{r.status_code} {r.text[:400]}", attempt > 0
                )
                break
            if result is None:
                result = Result(t0, time.monotonic(), -1, False, "both gateways refused the connection")
            with self.lock:
                self.results.append(result)
        for c in clients:
            c.close()

    def window(self, t_from: float, t_to: float | None = None) -> list[Result]:
        with self.lock:
            return [r for r in self.results if r.start >= t_from and (t_to is None or r.start < t_to)]

    def wait_requests(self, count: int, after: float, timeout: float = 60) -> None:
        wait_for(
            lambda: len([r for r in self.window(after) if r.end > 0]) >= count,
            timeout,
            what=f"{count} requests through the gateways",
        )


def summary(results: list[Result]) -> dict[str, Any]:
    return {
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
        "by_gateway": [sum(r.ok and r.gateway == g for r in results) for g in (0, 1)],
        "failed_over": sum(r.failed_over for r in results),
        "errors": sorted({r.detail for r in results if not r.ok})[:5],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    require_podman()
    t0 = time.monotonic()
    images = build_images()
    FIGURES["image_build_s"] = float(images.pop("build_s"))
    FIGURES["image_mb"] = {
        "slim": round(image_size_mb(images["IMAGE_SLIM"])),
        "cpu": round(image_size_mb(images["IMAGE_CPU"])),
    }
    admin, join = secrets.token_hex(24), secrets.token_hex(24)
    ports = [free_port(), free_port()]
    project = ComposeProject(
        tmp_path_factory.mktemp("compose"),
        {
            "MODELFLEET_ADMIN_TOKEN": admin,
            "MODELFLEET_JOIN_TOKEN": join,
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "MODELFLEET_IMAGE": images["IMAGE_SLIM"],
            "MODELFLEET_WORKER_IMAGE": images["IMAGE_CPU"],
            "POSTGRES_IMAGE": images["IMAGE_POSTGRES"],
            "GATEWAY_1_PORT": str(ports[0]),
            "GATEWAY_2_PORT": str(ports[1]),
            "MODELFLEET_RESCHEDULE_GRACE": "5",
        },
    )
    try:
        t_up = time.monotonic()
        project.compose("up", "-d")
        gateways = [f"http://127.0.0.1:{p}" for p in ports]
        for g in gateways:
            wait_for(
                lambda g=g: httpx.get(f"{g}/health/ready", timeout=2).status_code == 200, 120, what=f"gateway {g} ready"
            )
        FIGURES["compose_up_to_ready_s"] = round(time.monotonic() - t_up, 1)
        yield Stack(project, gateways, admin)
    except BaseException:
        for service in SERVICES:
            print(f"\n--- {service}:\n{project.logs(service)}")
        raise
    finally:
        FIGURES["suite_s"] = round(time.monotonic() - t0, 1)
        out = ROOT / "build" / "container-test.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(FIGURES, indent=2))
        print("\ncontainer test figures:", json.dumps(FIGURES, indent=2))
        project.down()


@dataclass
class Stack:
    project: ComposeProject
    gateways: list[str]
    admin: str

    def cluster(self, method: str, path: str, gateway: int = 0, **kw: Any) -> httpx.Response:
        """The cluster API through a gateway's pass-through to the controllers."""
        return httpx.request(
            method,
            f"{self.gateways[gateway]}/v1/cluster/{path}",
            timeout=30,
            headers={"authorization": f"Bearer {self.admin}"},
            **kw,
        )

    def ready_instances(self, model: str = MODEL) -> list[dict[str, Any]]:
        r = self.cluster("GET", "instances", params={"model": model})
        r.raise_for_status()
        return [i for i in r.json()["data"] if i["state"] == "ready"]

    def routable(self, gateway: int, model: str = MODEL) -> int:
        r = httpx.get(
            f"{self.gateways[gateway]}/v1/gateway/status", timeout=5, headers={"authorization": f"Bearer {self.admin}"}
        )
        return sum(
            sum(i["enabled"] and not i["ejected"] for i in m["instances"])
            for m in r.json()["models"]
            if m["name"] == model
        )


def test_ha_layout_survives_a_controller_the_database_a_gateway_and_a_worker(stack: Stack) -> None:
    p = stack.project
    # -- a deployment of two replicas (spread: one per worker) and an API key
    r = stack.cluster(
        "POST",
        "deployments",
        json={
            "name": MODEL,
            "backend": "sentence-transformers",
            "source": MODEL,
            "replicas": 2,
            "max_concurrency": 4,
            "params": {"n_threads": 1},
        },
    )
    assert r.status_code in (200, 201), r.text
    t_deploy = time.monotonic()
    wait_for(lambda: len(stack.ready_instances()) == 2, 180, what="2 ready replicas")
    FIGURES["deploy_to_2_ready_s"] = round(time.monotonic() - t_deploy, 1)
    assert {i["worker_id"] for i in stack.ready_instances()} == {"worker-1", "worker-2"}
    r = stack.cluster("POST", "keys", json={"name": "container-test"})
    assert r.status_code in (200, 201), r.text
    key, key_id = r.json()["key"], r.json()["id"]
    for g in (0, 1):
        wait_for(lambda g=g: stack.routable(g) == 2, 30, what=f"gateway {g + 1} routes both replicas")
        wait_for(
            lambda g=g: (
                httpx.post(
                    f"{stack.gateways[g]}/v1/embeddings", timeout=30, json={"model": MODEL, "input": "x"}
                ).status_code
                == 401
            ),
            10,
            what=f"gateway {g + 1} requires the key",
        )

    client = BalancedClient(stack.gateways, key).start()
    try:
        client.wait_requests(8, t_deploy)

        # -- kill -9 of controller-1: workers and gateways move to controller-2
        t = time.monotonic()
        podman("kill", "-s", "KILL", p.container("controller-1"))
        time.sleep(8)
        s = FIGURES["controller_kill"] = summary(client.window(t))
        assert s["failed"] == 0 and s["requests"] >= 8, s

        # -- PostgreSQL stopped, its container removed, created again from the named volume
        t = time.monotonic()
        mounts = {m["Destination"]: m.get("Name") for m in p.inspect("postgres")["Mounts"]}
        assert mounts["/var/lib/postgresql/data"] == f"{p.name}_pgdata", mounts
        podman("stop", "-t", "30", p.container("postgres"))
        wait_for(
            lambda: stack.cluster("GET", "deployments").status_code == 503,
            30,
            what="controllers to report the store unavailable",
        )
        time.sleep(3)
        podman("rm", p.container("postgres"))
        p.compose("up", "-d", "--no-deps", "postgres")
        t_back = time.monotonic()
        wait_for(lambda: stack.cluster("GET", "deployments").status_code == 200, 90, what="controllers ready again")
        FIGURES["postgres_restart_to_controllers_ready_s"] = round(time.monotonic() - t_back, 1)
        time.sleep(10)  # workers re-report, gateways take the returning controllers' tables
        s = FIGURES["postgres_outage"] = summary(client.window(t))
        assert s["failed"] == 0 and s["requests"] >= 4, s
        deployments = {d["name"]: d for d in stack.cluster("GET", "deployments").json()["data"]}
        assert deployments[MODEL]["replicas"] == 2
        keys = {k["id"]: k for k in stack.cluster("GET", "keys").json()["data"]}
        assert keys[key_id]["name"] == "container-test" and not keys[key_id]["revoked"]

        # -- kill -9 of gateway-2 while the client uses both
        t_phase = time.monotonic()
        client.wait_requests(4, t_phase)
        podman("kill", "-s", "KILL", p.container("gateway-2"))
        t_killed = time.monotonic()  # gateway-2 is dead by now
        time.sleep(6)
        during = client.window(t_phase)
        after = [r for r in during if r.start >= t_killed]
        lost = [r for r in during if not r.ok]
        s = FIGURES["gateway_kill"] = {**summary(after), "lost_in_flight": len(lost)}
        # Only requests already sent to gateway-2 when it died can fail, at most one per thread.
        assert all(r.gateway == 1 and r.start < t_killed for r in lost), [(r.gateway, r.detail) for r in lost]
        assert len(lost) <= CONCURRENCY
        assert s["failed"] == 0 and s["by_gateway"][0] >= 4, s

        # -- kill -9 of worker-2, which stays down: its replica moves to worker-1
        wait_for(lambda: stack.routable(0) == 2, 30, what="gateway 1 routes both replicas")
        t = time.monotonic()
        podman("kill", "-s", "KILL", p.container("worker-2"))  # stays down: podman restarts no killed container
        wait_for(
            lambda: [i["worker_id"] for i in stack.ready_instances()] == ["worker-1", "worker-1"],
            120,
            interval=0.5,
            what="both replicas ready on worker-1",
        )
        FIGURES["worker_kill_to_replica_replaced_s"] = round(time.monotonic() - t, 1)
        time.sleep(2)
        s = FIGURES["worker_kill"] = summary(client.window(t))
        assert s["failed"] == 0, s
    finally:
        client.close()
    FIGURES["total_requests"] = len(client.results)

    # -- llama.cpp in the image: the bundled chat model answers through the surviving gateway
    r = stack.cluster(
        "POST",
        "deployments",
        json={
            "name": CHAT_MODEL,
            "backend": "llama.cpp",
            "source": CHAT_MODEL,
            "replicas": 1,
            "params": {"n_ctx": 512, "n_threads": 1},
        },
    )
    assert r.status_code in (200, 201), r.text
    wait_for(lambda: stack.routable(0, CHAT_MODEL) == 1, 180, interval=0.5, what="the chat model routable")
    r = httpx.post(
        f"{stack.gateways[0]}/v1/chat/completions",
        timeout=60,
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": CHAT_MODEL,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello to the people reading this test."}],
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text

    # -- graceful stops end well within their grace period (tini forwards SIGTERM)
    stops = FIGURES["graceful_stop_s"] = {}
    for service in ("gateway-1", "worker-1", "controller-2"):
        t = time.monotonic()
        podman("stop", "-t", "30", p.container(service), timeout=60)
        stops[service] = round(time.monotonic() - t, 1)
        code = p.inspect(service)["State"]["ExitCode"]
        assert code in (0, 143), f"{service} exited {code} (137 would be a SIGKILL):\n{p.logs(service)}"
    # gateway-1 waits MODELFLEET_SHUTDOWN_DELAY_S (5 s) with readiness off before it closes
    assert 5 <= stops["gateway-1"] < 20, stops
    assert stops["worker-1"] < 20 and stops["controller-2"] < 20, stops
    assert "not ready; serving 5.0 s more" in p.logs("gateway-1", 200)
