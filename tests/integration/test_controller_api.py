"""The controller over real HTTP, as workers, gateways and the CLI see it (SQLite store)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import free_port
from tests.support.procs import MODELFLEET, wait_for

ADMIN, JOIN = "admin-secret", "join-secret"


def worker_body(wid: str = "w1", **extra) -> dict:
    return {
        "worker": {
            "id": wid,
            "name": wid,
            "address": "127.0.0.1",
            "port": 8200,
            "resources": {"cpu_cores": 2, "memory_total": 8 << 30, "memory_free": 4 << 30, "gpus": []},
        },
        **extra,
    }


@pytest.fixture
def ctl(procs, sqlite_url, request):
    port = free_port()
    procs.controller(
        "ctl",
        port,
        getattr(request, "param", None) or "memory://",
        "--admin-token",
        ADMIN,
        "--join-token",
        JOIN,
        "--heartbeat-interval",
        "0.5",
    )
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def beating(ctl: str, worker_id: str) -> Iterator[None]:
    """A worker heartbeating every 0.2 s in the background (alive while the block runs)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):  # a missed beat, as a worker would have
                httpx.post(f"{ctl}/v1/cluster/heartbeat", json=worker_body(worker_id), headers=join_h())
            stop.wait(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def admin_h() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def join_h() -> dict[str, str]:
    return {"authorization": f"Bearer {JOIN}"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELFLEET, *args], capture_output=True, text=True, timeout=60)


def test_tokens_are_enforced(ctl):
    hb = f"{ctl}/v1/cluster/heartbeat"
    assert httpx.post(hb, json=worker_body()).status_code == 403
    r = httpx.post(hb, json=worker_body(), headers={"authorization": "Bearer nope"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_token"
    assert "nope" not in r.text
    dep = {"name": "m", "backend": "openai", "source": "http://x"}
    assert httpx.post(f"{ctl}/v1/cluster/deployments", json=dep).status_code == 401
    assert httpx.post(f"{ctl}/v1/cluster/deployments", json=dep, headers=join_h()).status_code == 403
    assert httpx.get(f"{ctl}/v1/cluster/workers").status_code == 401
    assert httpx.get(f"{ctl}/v1/cluster/workers", headers=admin_h()).status_code == 200


def test_heartbeat_registers_and_cli_lists_worker(ctl):
    r = httpx.post(f"{ctl}/v1/cluster/heartbeat", json=worker_body("gpu-box"), headers=join_h())
    assert r.status_code == 200, r.text
    assert r.json()["registered"] is True and r.json()["assignments"] == []
    r2 = httpx.post(f"{ctl}/v1/cluster/heartbeat", json=worker_body("gpu-box"), headers=join_h())
    assert r2.json()["registered"] is False
    # The fixture's interval is 0.5 s (dead after 1.5 s) and a CLI start can take longer
    # than that on a busy machine: beat in the background while the CLI reads.
    with beating(ctl, "gpu-box"):
        out = cli("workers", "--controller", ctl, "--admin-token", ADMIN, "--json")
        table = cli("workers", "--controller", ctl, "--admin-token", ADMIN)
    assert out.returncode == 0, out.stderr
    (w,) = json.loads(out.stdout)
    assert w["name"] == "gpu-box" and w["alive"] is True and w["resources"]["cpu_cores"] == 2
    assert 0 <= w["heartbeat_age"] < 5
    assert "gpu-box" in table.stdout and "alive" in table.stdout
    denied = cli("workers", "--controller", ctl)
    assert denied.returncode == 1 and "admin token required" in denied.stderr


def test_malformed_heartbeat_names_the_field(ctl):
    body = worker_body()
    del body["worker"]["address"]
    r = httpx.post(f"{ctl}/v1/cluster/heartbeat", json=body, headers=join_h())
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "worker.address"
    r = httpx.post(
        f"{ctl}/v1/cluster/heartbeat", content=b"{not json", headers={**join_h(), "content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    # Exact types: pydantic's lax mode read ``false`` as 0 (a revision, a pid); found by schemathesis.
    r = httpx.post(f"{ctl}/v1/cluster/heartbeat", json=worker_body(known_revision=False), headers=join_h())
    assert r.status_code == 422 and r.json()["error"]["param"] == "known_revision", r.text
    port_as_text = worker_body()
    port_as_text["worker"]["port"] = "8200"
    r = httpx.post(f"{ctl}/v1/cluster/heartbeat", json=port_as_text, headers=join_h())
    assert r.status_code == 422 and r.json()["error"]["param"] == "worker.port", r.text


def test_worker_goes_dead_and_routes_follow(ctl):
    """Health is computed on read: a silent worker turns dead after 3 intervals, and the
    routes revision moves so long-polling gateways learn it."""
    httpx.post(
        f"{ctl}/v1/cluster/heartbeat",
        headers=join_h(),
        json=worker_body(
            "w1",
            instances=[
                {
                    "id": "w1/m",
                    "declared": True,
                    "state": "ready",
                    "endpoint": "http://127.0.0.1:9",
                    "model": "m",
                    "backend": "openai",
                    "source": "http://127.0.0.1:9",
                    "max_concurrency": 2,
                }
            ],
        ),
    )
    routes = httpx.get(f"{ctl}/v1/cluster/routes", headers=join_h()).json()
    (m,) = routes["models"]
    assert m["name"] == "m" and [i["id"] for i in m["instances"]] == ["w1/m"]
    t0 = time.monotonic()
    since = routes["revision"]
    while True:
        r = httpx.get(f"{ctl}/v1/cluster/routes", params={"since": since, "wait": 10}, headers=join_h(), timeout=15)
        assert r.status_code == 200
        if r.json()["models"][0]["instances"] == []:  # model still known, no routable instance
            break
        # Woken by an earlier change (the health watch seeing w1 alive, if it had not yet when
        # the table above was built): wait on from there.
        since = r.json()["revision"]
        assert time.monotonic() - t0 < 1.0
    # Dead after 3 x 0.5 s; the long poll woke for that change, not at the end of its 10 s wait.
    assert 1.0 < time.monotonic() - t0 < 9.0
    workers = httpx.get(f"{ctl}/v1/cluster/workers", headers=admin_h()).json()["data"]
    assert workers[0]["alive"] is False


def test_routes_long_poll_answers_on_change_and_304_otherwise(ctl):
    rev = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()["revision"]
    t0 = time.monotonic()
    r = httpx.get(f"{ctl}/v1/cluster/routes", params={"since": rev, "wait": 1}, headers=admin_h(), timeout=5)
    assert r.status_code == 304 and time.monotonic() - t0 >= 0.9


    def create_later() -> None:
        time.sleep(0.5)
        httpx.post(
            f"{ctl}/v1/cluster/deployments",
            headers=admin_h(),
            json={"name": "late", "backend": "openai", "source": "http://127.0.0.1:9"},
        )

    threading.Thread(target=create_later).start()
    t0 = time.monotonic()
    r = httpx.get(f"{ctl}/v1/cluster/routes", params={"since": rev, "wait": 10}, headers=admin_h(), timeout=15)
    assert r.status_code == 200 and r.json()["revision"] > rev
    assert [m["name"] for m in r.json()["models"]] == ["late"]
    assert time.monotonic() - t0 < 1.5  # visible well within 1 s of the write


def test_deployment_crud(ctl):
    url = f"{ctl}/v1/cluster/deployments"
    body = {"name": "chat", "backend": "llama.cpp", "source": "smollm2-135m-instruct", "replicas": 2}
    assert httpx.post(url, json=body, headers=admin_h()).status_code == 201
    assert httpx.post(url, json=body, headers=admin_h()).status_code == 409
    r = httpx.patch(f"{url}/chat", json={"replicas": 3}, headers=admin_h())
    assert r.status_code == 200 and r.json()["replicas"] == 3
    bad = httpx.patch(f"{url}/chat", json={"replicas": -1}, headers=admin_h())
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "replicas"
    assert httpx.get(f"{url}/chat", headers=admin_h()).json()["replicas"] == 3
    assert httpx.delete(f"{url}/chat", headers=admin_h()).status_code == 204
    assert httpx.get(f"{url}/chat", headers=admin_h()).status_code == 404


def test_keys_created_listed_revoked_through_cli(ctl):
    created = cli("keys", "create", "alice", "--controller", ctl, "--admin-token", ADMIN, "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("mf-")
    routes = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()
    import hashlib

    assert routes["api_keys"] == [{"id": key["id"], "secret_hash": hashlib.sha256(key["key"].encode()).hexdigest()}]
    listed = cli("keys", "list", "--controller", ctl, "--admin-token", ADMIN, "--json")
    assert key["key"] not in listed.stdout and json.loads(listed.stdout)[0]["name"] == "alice"
    assert cli("keys", "revoke", key["id"], "--controller", ctl, "--admin-token", ADMIN).returncode == 0
    routes = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()
    assert routes["api_keys"] == []


def test_wrong_store_url_stops_with_one_line_without_password(tmp_path):
    port = free_port()
    closed = free_port()
    r = subprocess.run(
        [*MODELFLEET, "controller", "--port", str(port), "--store", f"postgresql://bob:hunter2@127.0.0.1:{closed}/db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("modelfleet controller: cannot use store postgresql://127.0.0.1:")
    assert "hunter2" not in r.stderr and "bob" not in r.stderr
    r = subprocess.run(
        [*MODELFLEET, "controller", "--port", str(port), "--store", "mongodb://h/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "unknown store URL scheme 'mongodb'" in r.stderr


def test_leader_is_reported(ctl):
    info = wait_for(lambda: httpx.get(f"{ctl}/v1/cluster/leader", headers=admin_h()).json(), 10, what="leader").copy()
    wait_for(
        lambda: httpx.get(f"{ctl}/v1/cluster/leader", headers=admin_h()).json()["this_is_leader"],
        10,
        what="this controller to lead",
    )
    assert info["this_controller"]


def test_metrics_exported(ctl):
    httpx.post(f"{ctl}/v1/cluster/heartbeat", json=worker_body(), headers=join_h())
    text = httpx.get(f"{ctl}/metrics").text
    assert 'modelfleet_controller_heartbeats_total{result="ok"} 1.0' in text
    assert "modelfleet_controller_store_up 1.0" in text



def test_keys_open_is_an_explicit_act_refused_while_a_key_lives(ctl, procs):
    created = json.loads(cli("keys", "create", "ops", "--controller", ctl, "--admin-token", ADMIN, "--json").stdout)
    refused = cli("keys", "open", "--controller", ctl, "--admin-token", ADMIN)
    assert refused.returncode == 1 and "not revoked" in refused.stderr
    assert httpx.post(f"{ctl}/v1/cluster/keys/open").status_code == 401  # admin only
    assert cli("keys", "revoke", created["id"], "--controller", ctl, "--admin-token", ADMIN).returncode == 0
    routes = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()
    assert routes["api_keys"] == [] and routes["auth_required"] is True  # every key revoked: still closed
    assert routes["auth"] == "required" and routes["cluster_id"]
    opened = cli("keys", "open", "--controller", ctl, "--admin-token", ADMIN)
    assert opened.returncode == 0, opened.stderr
    routes = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()
    assert routes["auth"] == "opened" and routes["auth_required"] is False
    assert "inference OPENED by an admin" in procs.all[0].log_tail(50)
    # memory:// is volatile by nature: allowed, with a warning line at start.
    assert "memory:// keeps nothing" in procs.all[0].log_tail(200)


def test_a_redis_without_persistence_is_refused_unless_allowed(procs, tmp_path):
    from tests.support.stores import private_store_or_skip

    server = private_store_or_skip("redis", False)
    try:
        port = free_port()
        r = subprocess.run([*MODELFLEET, "controller", "--port", str(port), "--store", server.url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"modelfleet controller: refusing store redis://127.0.0.1:{server.port}: the Redis "
                               "server has neither RDB snapshots (save '') nor AOF (appendonly no)")
        assert "--allow-volatile-store" in last
        flag = procs.controller("ctl-flag", free_port(), server.url, "--allow-volatile-store")
        assert "VOLATILE (allowed by --allow-volatile-store)" in flag.log_tail(50)
        procs.controller("ctl-env", free_port(), server.url, env={"MODELFLEET_ALLOW_VOLATILE_STORE": "1"})
    finally:
        procs.stop_all()
        server.destroy()


def test_a_redis_that_refuses_config_is_used_with_a_warning(procs):
    """A managed Redis often refuses CONFIG: its persistence cannot be told, so the controller
    starts, and says so."""
    from tests.support.stores import private_store_or_skip

    server = private_store_or_skip("redis", False, "--rename-command", "CONFIG", "")
    try:
        ctl = procs.controller("ctl", free_port(), server.url)
        assert "cannot tell whether the redis store keeps its data across a restart" in ctl.log_tail(50)
    finally:
        procs.stop_all()
        server.destroy()


def test_revision_never_goes_backwards_after_the_store_is_restored(procs, sqlite_url, tmp_path):
    """The store is restored from an older copy (same cluster identity, lower revision) under a
    running controller: it moves the revision past what it served, so a deployment made after
    the restore still reaches the worker (nothing waits for the revision to climb back), and a
    gateway ahead of the store is never answered with a lower revision."""
    import sqlite3

    port = free_port()
    procs.controller("ctl", port, sqlite_url, "--admin-token", ADMIN, "--join-token", JOIN,
                     "--heartbeat-interval", "0.5")
    ctl = f"http://127.0.0.1:{port}"
    with beating(ctl, "w1"):
        def assignments(known: int) -> tuple[int, list[str]]:
            r = httpx.post(f"{ctl}/v1/cluster/heartbeat", json=worker_body("w1", known_revision=known),
                           headers=join_h()).json()
            return r["revision"], sorted(a["model"] for a in r["assignments"] or [])

        def deploy(name: str) -> None:
            body = {"name": name, "backend": "openai", "source": "http://127.0.0.1:9", "placement": {"memory": 1}}
            assert httpx.post(f"{ctl}/v1/cluster/deployments", json=body, headers=admin_h()).status_code == 201

        db = sqlite_url.removeprefix("sqlite:///")
        backup = tmp_path / "backup.db"
        with sqlite3.connect(db) as live, sqlite3.connect(backup) as copy:
            live.backup(copy)
        deploy("before-restore")
        served, _ = wait_for(lambda: (a := assignments(-1))[1] == ["before-restore"] and a, 15,
                             what="the replica placed on w1")
        cluster_id = httpx.get(f"{ctl}/health/ready").json()["cluster_id"]

        with sqlite3.connect(backup) as copy, sqlite3.connect(db) as live:
            copy.backup(live)  # the restore: an older revision, the same cluster identity
        # The controller moves it past what it served on its next readiness pass (and logs
        # "went back below"); a write racing that pass moves it past too (revisions follow the
        # store's clock in ms): either way, readers see it above `served` again.
        wait_for(lambda: httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()["revision"] > served, 20,
                 what="the revision above what the controller served")
        deploy("after-restore")
        # The worker still holds the revision it saw before the restore: it gets the new replica.
        wait_for(lambda: assignments(served)[1] == ["after-restore"], 15, what="the new replica on w1")

        # A gateway that serves a revision above the store's is never answered with a lower one.
        ahead = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h()).json()["revision"] + 1000
        r = httpx.get(f"{ctl}/v1/cluster/routes", params={"seen": ahead, "cluster": cluster_id}, headers=admin_h())
        assert r.json()["revision"] > ahead
        other = httpx.get(f"{ctl}/v1/cluster/routes", params={"seen": ahead + 10**6, "cluster": "another"},
                          headers=admin_h())
        assert other.json()["revision"] < ahead + 10**6  # another cluster's gateway moves nothing


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
