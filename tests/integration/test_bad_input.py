"""Client values that the store or the ids cannot hold, against a real controller on each real
store: every one is a 4xx naming the field, never a 503 (which also sends the CLI to the next
controller); values at the limits are accepted and read back. And a deployment the
reconciler cannot act on (written straight into the store, as an older version let in)
does not stop any other deployment from being placed: its reason is on it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import httpx
import pytest

from modelfleet.models import DEPLOYMENT_NAME_MAX_LEN, INT32_MAX, Deployment
from modelfleet.store import open_store
from tests.conftest import free_port
from tests.gateway.conftest import JOIN, FakeWorker
from tests.support.procs import MODELFLEET, wait_for

pytestmark = pytest.mark.timeout(120)
ADMIN = "bad-input-admin"
URL_FIXTURES = {"sqlite": "sqlite_url", "postgresql": "pg_url", "mysql": "mysql_url", "redis": "redis_url"}


def admin_h() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(params=list(URL_FIXTURES))
def store_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(URL_FIXTURES[request.param])


def start_controller(procs, store_url: str) -> tuple[str, object]:
    port = free_port()
    # The shared test Redis runs without persistence (as CI's does): the controller refuses
    # such a store unless told, which tests/integration/test_controller_api.py checks.
    volatile = ["--allow-volatile-store"] if store_url.startswith("redis") else []
    p = procs.controller(
        "ctl", port, store_url, "--admin-token", ADMIN, "--join-token", JOIN, "--heartbeat-interval", "0.5", *volatile
    )
    return f"http://127.0.0.1:{port}", p


def test_out_of_range_values_are_4xx_on_every_store(procs, store_url: str) -> None:
    ctl, _ = start_controller(procs, store_url)
    deps = f"{ctl}/v1/cluster/deployments"
    ok = {"name": "ok", "backend": "openai", "source": "http://127.0.0.1:9"}
    assert httpx.post(deps, json=ok, headers=admin_h()).status_code == 201
    refused = [
        ("POST", deps, {**ok, "name": "n" * 200}, "name"),
        ("POST", deps, {**ok, "name": "n" * (DEPLOYMENT_NAME_MAX_LEN + 1)}, "name"),
        ("POST", deps, {**ok, "name": "x", "weight": 4294967297}, "weight"),
        ("POST", deps, {**ok, "name": "x", "max_concurrency": 2**31}, "max_concurrency"),
        ("POST", deps, {**ok, "name": "x", "replicas": 10**12}, "replicas"),
        ("POST", deps, {**ok, "name": "x", "source": "/models/a\u0000b"}, "source"),
        ("POST", deps, {**ok, "name": "x", "source": "s" * 5000}, "source"),
        ("POST", deps, {**ok, "name": "x", "backend": "b" * 300}, "backend"),
        ("POST", deps, {**ok, "name": "x", "params": {"pad": "p" * 70_000}}, "params"),
        # A lone surrogate: valid JSON, but no driver can encode it.
        ("POST", deps, b'{"name": "x", "backend": "openai", "params": {"k": "\\ud800"}}', "params"),
        (
            "POST",
            deps,
            {**ok, "name": "x", "placement": {"labels": {"k" * 200: "v"}}},
            f"placement.labels.{'k' * 200}.[key]",
        ),
        ("POST", deps, {**ok, "name": "x", "placement": {"memory": 2**63}}, "placement.memory"),
        ("POST", deps, {**ok, "name": "x", "placement": {"gpus": 10**6}}, "placement.gpus"),
        ("PATCH", f"{deps}/ok", {"weight": 4294967297}, "weight"),
        ("PATCH", f"{deps}/ok", {"max_concurrency": 10**10}, "max_concurrency"),
        ("PATCH", f"{deps}/ok", {"wieght": 5}, "wieght"),  # a typo is refused, not silently ignored
        ("POST", f"{ctl}/v1/cluster/keys", {"name": "k" * 300}, "name"),
        ("POST", f"{ctl}/v1/cluster/keys", {"name": "a\u0000b"}, "name"),
        (
            "POST",
            f"{ctl}/v1/cluster/heartbeat",
            {"worker": {"id": "w" * 200, "name": "w", "address": "a", "port": 1}},
            "worker.id",
        ),
        (
            "POST",
            f"{ctl}/v1/cluster/heartbeat",
            {
                "worker": {"id": "w1", "name": "w", "address": "a", "port": 1},
                "instances": [{"id": "i" * 300, "declared": True}],
            },
            "instances.0.id",
        ),
    ]
    for method, url, body, param in refused:
        headers = {"authorization": f"Bearer {JOIN}"} if url.endswith("heartbeat") else admin_h()
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.request(
            method, url, content=content, headers={**headers, "content-type": "application/json"}, timeout=10
        )
        assert r.status_code in (400, 422), (method, url, param, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["param"] == param and err["message"], err
    # NUL in a path or a query: no store can look it up (PostgreSQL refuses it outright).
    for url in (f"{deps}/a%00b", f"{ctl}/v1/cluster/instances?model=a%00b"):
        r = httpx.get(url, headers=admin_h(), timeout=10)
        assert r.status_code == 400, r.text
    assert httpx.get(f"{deps}/ok", headers=admin_h()).json()["weight"] == 100  # nothing was changed

    # At the limits: accepted, stored, read back exactly.
    edge = {
        "name": "e" * DEPLOYMENT_NAME_MAX_LEN,
        "backend": "openai",
        "source": "http://127.0.0.1:9",
        "weight": INT32_MAX,
        "max_concurrency": 100_000,
        "replicas": 0,
        "params": {"n": 2**40, "s": "é" * 1000},
    }
    r = httpx.post(deps, json=edge, headers=admin_h(), timeout=10)
    assert r.status_code == 201, r.text
    back = httpx.get(f"{deps}/{edge['name']}", headers=admin_h(), timeout=10).json()
    assert {k: back[k] for k in edge} == edge
    r = httpx.patch(f"{deps}/ok", json={"weight": INT32_MAX}, headers=admin_h(), timeout=10)
    assert r.status_code == 200 and r.json()["weight"] == INT32_MAX


def log_count(controller, name: str) -> int:
    return controller.log_path.read_text().count(f"deployment {name} cannot be reconciled")


def models_json(ctl: str) -> list[dict]:
    out = subprocess.run(
        [*MODELFLEET, "models", "--json", "--controller", ctl, "--admin-token", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
def test_a_poison_deployment_stays_with_itself(procs, store_url: str) -> None:
    ctl, controller = start_controller(procs, store_url)
    worker = FakeWorker([ctl]).start()
    try:

        async def inject() -> None:
            # What the API now refuses, written the way an older version let it in.
            store = open_store(store_url)
            try:
                await store.put_deployment(Deployment(name="p" * 200, backend="openai", source="http://127.0.0.1:9"))
                if store_url.startswith("postgresql"):
                    # Fits the stored JSON but not the instances' 32-bit column: the store refuses the write.
                    await store.put_deployment(
                        Deployment(name="huge", backend="openai", source="http://127.0.0.1:9", max_concurrency=2**40)
                    )
            finally:
                await store.close()

        asyncio.run(inject())
        r = httpx.post(
            f"{ctl}/v1/cluster/deployments",
            headers=admin_h(),
            timeout=10,
            json={"name": "good", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 2},
        )
        assert r.status_code == 201, r.text

        def placed() -> bool:
            data = httpx.get(f"{ctl}/v1/cluster/instances", params={"model": "good"}, headers=admin_h()).json()
            return len(data["data"]) == 2 and all(i["worker_id"] == "w1" for i in data["data"])

        wait_for(placed, 15, what="the good deployment placed despite the poison one")

        def deployments() -> dict[str, dict]:
            return {d["name"]: d for d in httpx.get(f"{ctl}/v1/cluster/deployments", headers=admin_h()).json()["data"]}

        wait_for(
            lambda: all(d["error"] for n, d in deployments().items() if n != "good"),
            10,
            what="the poison deployments carry their reason",
        )
        deps = deployments()
        assert "replica ids" in deps["p" * 200]["error"] and "128" in deps["p" * 200]["error"]
        assert deps["good"]["error"] is None
        if store_url.startswith("postgresql"):
            assert deps["huge"]["error"].startswith("creating a replica: "), deps["huge"]
        listed = {m["name"]: m for m in models_json(ctl)}
        assert listed["p" * 200]["error"] == deps["p" * 200]["error"] and listed["good"]["error"] is None

        time.sleep(3)  # three more reconcile passes: still one log line per poison deployment
        log = controller.log_path.read_text()
        assert log_count(controller, "p" * 200) == 1, log[-3000:]
        if store_url.startswith("postgresql"):
            assert log_count(controller, "huge") == 1, log[-3000:]
        assert "singleton loop" not in log
        # Fixed by its operator (deleted here): the reason goes with it; the rest never stopped.
        assert httpx.delete(f"{ctl}/v1/cluster/deployments/{'p' * 200}", headers=admin_h()).status_code == 204
        text = httpx.get(f"{ctl}/metrics").text
        assert "modelfleet_reconciler_failing_deployments" in text
    finally:
        worker.stop()
