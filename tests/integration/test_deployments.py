"""Deployments on a real controller, worker and gateway, with the bundled chat model:
assignments written into the store start and stop runners; scale up and down; undeploy
leaves no runner process; a restarted controller loses no deployment; `modelfleet chat`
streams a reply through the gateway."""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import psutil
import pytest

from modelfleet.models import Deployment, InstanceSpec, Placement
from modelfleet.store import open_store
from tests.conftest import free_port
from tests.support.procs import MODELFLEET, wait_for

pytestmark = pytest.mark.timeout(400)
CHAT = "smollm2-135m-instruct"


def runners_of(worker_pid: int) -> list[psutil.Process]:
    """Runner processes under a worker agent (backend llama.cpp: llama.cpp's llama-server)."""
    out = []
    for p in psutil.Process(worker_pid).children(recursive=True):
        try:
            if p.name() == "llama-server":
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def instances(ctl: str, model: str | None = None) -> list[dict]:
    return httpx.get(f"{ctl}/v1/cluster/instances", params={"model": model} if model else {}, timeout=10).json()["data"]


def cli(ctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELFLEET, *args, "--controller", ctl], capture_output=True, text=True, timeout=60)


@pytest.fixture
def cluster(procs, sqlite_url, tmp_path):
    cport = free_port()
    ctl = f"http://127.0.0.1:{cport}"
    controller = procs.controller("ctl", cport, sqlite_url, "--heartbeat-interval", "1")
    worker = procs.worker("w1", free_port(), ctl, "--heartbeat-interval", "1", "--runner-port-start",
                          str(free_port()))
    worker.wait_ready(60)
    return {"ctl": ctl, "port": cport, "controller": controller, "worker": worker, "store": sqlite_url}


def test_assignments_written_in_the_store_start_and_stop_runners(cluster):
    """The worker side of placement, without the scheduler: an instance row assigned to the
    worker starts a runner; deleting the row stops it."""
    ctl, store_url = cluster["ctl"], cluster["store"]

    async def write(op: str) -> None:
        store = open_store(store_url)
        try:
            if op == "create":
                # The deployment's label matches no worker, so the scheduler places nothing
                # itself: the only replica is the one written here by hand.
                await store.put_deployment(Deployment(name="hand", backend="llama.cpp", source=CHAT, replicas=1,
                                                      placement=Placement(labels={"nowhere": "x"})))
                await store.create_instance(InstanceSpec(id="by-hand", model="hand", deployment="hand",
                                                         worker_id="w1", backend="llama.cpp", source=CHAT))
            else:
                await store.delete_instance("by-hand")
        finally:
            await store.close()

    asyncio.run(write("create"))
    wait_for(lambda: [(i["id"], i["state"]) for i in instances(ctl)] == [("by-hand", "ready")], 120,
             what="assigned instance ready")
    assert httpx.get(f"{ctl}/v1/cluster/instances/by-hand").json()["worker_id"] == "w1"
    assert len(runners_of(cluster["worker"].pid)) == 1
    asyncio.run(write("delete"))
    wait_for(lambda: runners_of(cluster["worker"].pid) == [], 30, what="runner stopped after delete")


def test_scale_undeploy_restart_and_chat(cluster, procs, tmp_path):
    ctl = cluster["ctl"]
    r = cli(ctl, "deploy", "chat", "--backend", "llama.cpp", "--model", CHAT, "--replicas", "1",
            "--param", "n_threads=1", "--param", "n_ctx=1024")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: [i["state"] for i in instances(ctl, "chat")] == ["ready"], 120, what="1 ready replica")
    assert len(runners_of(cluster["worker"].pid)) == 1

    assert cli(ctl, "scale", "chat", "2").returncode == 0
    wait_for(lambda: [i["state"] for i in instances(ctl, "chat")] == ["ready", "ready"], 120,
             what="2 ready replicas")
    assert len(runners_of(cluster["worker"].pid)) == 2

    # `modelfleet chat` through a gateway: the reply streams to stdout.
    gport = free_port()
    gateway = f"http://127.0.0.1:{gport}"
    procs.start("gateway", [*MODELFLEET, "gateway", "--controller", ctl, "--host", "127.0.0.1", "--port", str(gport),
                            "--snapshot-path", str(tmp_path / "routes.json")],
                ready_url=f"{gateway}/health/ready").wait_ready(60)
    chat = subprocess.run([*MODELFLEET, "chat", "chat", "--gateway", gateway, "--max-tokens", "12"],
                          input="Say hello\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("chat> ") and len(chat.stdout.strip()) > len("chat>")
    assert "[error]" not in chat.stdout

    assert cli(ctl, "scale", "chat", "1").returncode == 0
    wait_for(lambda: len(instances(ctl, "chat")) == 1 and len(runners_of(cluster["worker"].pid)) == 1, 60,
             what="scaled down to 1 runner")

    # A restarted controller finds the deployment in the store.
    cluster["controller"].kill()
    procs.controller("ctl-again", cluster["port"], cluster["store"], "--heartbeat-interval", "1")
    listed = cli(ctl, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    assert any(m["name"] == "chat" and m["replicas"] == 1 and m["deployed"] for m in __import__("json").loads(
        listed.stdout))

    assert cli(ctl, "undeploy", "chat").returncode == 0
    wait_for(lambda: runners_of(cluster["worker"].pid) == [] and instances(ctl, "chat") == [], 60,
             what="no runner left after undeploy")
