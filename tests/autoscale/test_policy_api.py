"""The autoscaling policy over HTTP and the CLI, on a real controller: validated (4xx naming
the field), replicas owned by the autoscaler (409), `scale --auto` / `scale N`, and
`modelfleet models` showing the policy and the last decision."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import ADMIN
from tests.support.procs import MODELFLEET, Procs, wait_for

pytestmark = pytest.mark.timeout(120)
H = {"authorization": f"Bearer {ADMIN}"}


def cli(ctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODELFLEET, *args, "--controller", ctl, "--admin-token", ADMIN], capture_output=True, text=True, timeout=60
    )


def test_policy_validated_owned_by_the_autoscaler_and_shown(procs: Procs, tmp_path: object) -> None:
    port = free_port()
    procs.controller("ctl", port, f"sqlite:///{tmp_path}/s.db", "--admin-token", ADMIN)  # type: ignore[operator]
    ctl = f"http://127.0.0.1:{port}"
    deps = f"{ctl}/v1/cluster/deployments"
    base = {"name": "m", "backend": "openai", "source": "http://127.0.0.1:9"}
    for bad, field in [
        ({"min_replicas": 3, "max_replicas": 2}, "autoscale"),
        ({"target_ongoing": 0}, "target_ongoing"),
        ({"idle_after_s": -1}, "idle_after_s"),
        ({"nope": 1}, "nope"),
    ]:
        r = httpx.post(deps, json={**base, "autoscale": bad}, headers=H, timeout=10)
        assert r.status_code == 422, r.text
        assert field in r.text
    out = cli(
        ctl,
        "deploy",
        "m",
        "--model",
        "http://127.0.0.1:9",
        "--backend",
        "openai",
        "--min-replicas",
        "0",
        "--max-replicas",
        "2",
        "--idle-after",
        "60",
    )
    assert out.returncode == 0, out.stderr
    d = httpx.get(f"{deps}/m", headers=H, timeout=10).json()
    assert d["autoscale"]["min_replicas"] == 0 and d["autoscale"]["idle_after_s"] == 60 and d["replicas"] == 1
    r = httpx.patch(f"{deps}/m", json={"replicas": 2}, headers=H, timeout=10)
    assert r.status_code == 409 and "autoscaled" in r.json()["error"]["message"]
    out = cli(ctl, "scale", "m", "--auto", "--max-replicas", "3")  # a merge: min 0 and idle 60 stay
    assert out.returncode == 0 and "autoscaled: 0..3" in out.stdout, (out.stdout, out.stderr)
    r = httpx.patch(f"{deps}/m", json={"autoscale": {"min_replicas": 5}}, headers=H, timeout=10)
    assert r.status_code == 422 and "max_replicas" in r.text  # merged, then validated
    r = httpx.patch(f"{deps}/m", json={"autoscale": {"min_replicas": 1}}, headers=H, timeout=10)
    assert r.status_code == 200 and r.json()["autoscale"]["max_replicas"] == 3
    # The autoscaler writes its first decision (no gateway reports: it holds).
    wait_for(
        lambda: (httpx.get(f"{deps}/m", headers=H, timeout=10).json().get("autoscale_status") or {}).get("reason"),
        15,
        what="a first decision",
    )
    out = cli(ctl, "models")
    assert "1..3 @ 4" in out.stdout and "holding" in out.stdout, out.stdout
    out = cli(ctl, "scale", "m", "2")
    assert out.returncode == 0
    d = httpx.get(f"{deps}/m", headers=H, timeout=10).json()
    assert d["autoscale"] is None and d["replicas"] == 2

    def metric() -> bool:
        text = httpx.get(f"{ctl}/metrics", headers=H, timeout=10).text
        return 'modelfleet_model_desired_replicas{model="m"} 2.0' in text and "modelfleet_model_load{" in text

    wait_for(metric, 15, what="desired replicas and load in the metrics")

    # A gateway's load report takes exact types: `false` is not a number of seconds.
    loads = f"{ctl}/v1/cluster/load"
    report = {"source": "gw#0", "revision": 1, "models": {"m": {"in_flight": 1, "queued": 0}}, "instances": {}}
    assert httpx.post(loads, json=report, headers=H, timeout=10).status_code == 204
    for bad in ({"expires_in": False}, {"revision": "1"}, {"models": {"m": {"in_flight": True}}}):
        r = httpx.post(loads, json={**report, **bad}, headers=H, timeout=10)
        assert r.status_code == 422, (bad, r.text)
