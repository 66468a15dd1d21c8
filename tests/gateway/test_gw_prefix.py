"""Prefix-aware routing through real gateways (subprocesses) in front of scripted upstreams:
two gateways that never talk send a prefix to the same instance, the load bound spreads a hot
prefix, embeddings are untouched, and the routing mode follows the deployment."""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.gateway.conftest import ADMIN, Cluster, admin_h
from tests.support.procs import MODELFLEET, wait_for

SYSTEM = "You answer questions about the ACME product catalogue, politely and briefly. " * 16  # ~1,300 chars


def chat(group: int, question: str) -> dict[str, object]:
    return {
        "model": "m",
        "max_tokens": 4,
        "messages": [{"role": "system", "content": f"[group {group}] {SYSTEM}"}, {"role": "user", "content": question}],
    }


def instance_of(gateway: str, body: dict[str, object], path: str = "/v1/chat/completions") -> str:
    r = httpx.post(f"{gateway}{path}", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-modelfleet-instance"]


def routing_of(cluster: Cluster, gateway: str, model: str = "m") -> str:
    status = httpx.get(f"{gateway}/v1/gateway/status", headers=admin_h(), timeout=5).json()
    return next(m["routing"] for m in status["models"] if m["name"] == model)


def deploy_m(cluster: Cluster, routing: str) -> httpx.Response:
    """A deployment named like the declared instances' model: it carries their routing."""
    return httpx.post(
        f"{cluster.controller_urls[0]}/v1/cluster/deployments",
        headers=admin_h(),
        json={"name": "m", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 0, "routing": routing},
    )


def three_instances_two_gateways(cluster: Cluster, *upstream_args: str, routing: str = "prefix") -> tuple[str, str]:
    cluster.controller()
    assert deploy_m(cluster, routing).status_code == 201
    for name in ("a", "b", "c"):
        url = cluster.upstream(name, *upstream_args)
        if cluster.worker is None:
            cluster.start_worker()
        assert cluster.worker is not None
        cluster.worker.declare(f"w1/{name}", "m", url)
    g1 = cluster.gateway()
    cluster.wait_routable("m", 3)
    g2 = cluster.gateway("--snapshot-path", str(cluster.tmp / "gw2-routes.json"))
    cluster.wait_routable("m", 3)
    return g1, g2


def test_two_gateways_send_each_prefix_to_the_same_instance(cluster: Cluster) -> None:
    g1, g2 = three_instances_two_gateways(cluster)
    assert routing_of(cluster, g1) == routing_of(cluster, g2) == "prefix"
    rng = random.Random(5)
    homes: dict[int, set[str]] = {}
    for n in range(60):
        group = n % 10
        gw = rng.choice((g1, g2))
        homes.setdefault(group, set()).add(
            instance_of(gw, chat(group, f"question {n}: " + "why? " * rng.randrange(60)))
        )
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 2  # and different prefixes spread out
    # A follow-up turn goes where its conversation went, from either gateway.
    turn1 = chat(3, "What is the warranty? " * 10)
    first = instance_of(g1, turn1)
    turn2 = dict(
        turn1,
        messages=[
            *turn1["messages"],
            {"role": "assistant", "content": "Two years."},  # type: ignore[list-item]
            {"role": "user", "content": "And for batteries?"},
        ],
    )
    assert instance_of(g2, turn2) == first == next(iter(homes[3]))


def test_the_load_bound_spreads_a_hot_prefix_and_embeddings_are_untouched(cluster: Cluster) -> None:
    g1, _ = three_instances_two_gateways(cluster, "--latency", "1.5")
    home = instance_of(g1, chat(1, "warm-up"))
    # Nine requests of one prefix at once: the home takes its bounded share, the rest spread.
    with ThreadPoolExecutor(9) as ex:
        got = Counter(ex.map(lambda i: instance_of(g1, chat(1, f"q{i}")), range(9)))
    assert len(got) >= 2, got
    assert got[home] == max(got.values())
    assert max(got.values()) <= 4, got  # at most 1.25 x (least + 1) + 1
    # One at a time, the same prefix stays home.
    for control in ("a", "b", "c"):
        cluster.control(control, latency=0.0)
    assert {instance_of(g1, chat(1, f"again {i}")) for i in range(5)} == {home}
    # Embeddings have no prompt key: least-outstanding P2C, which spreads identical inputs.
    emb = {instance_of(g1, {"model": "m", "input": SYSTEM}, "/v1/embeddings") for _ in range(30)}
    assert len(emb) >= 2, emb


def test_routing_follows_the_deployment_and_refuses_unknown_modes(cluster: Cluster) -> None:
    g1, _ = three_instances_two_gateways(cluster, routing="auto")
    ctl = cluster.controller_urls[0]
    # "auto" is P2C (docs/gateway.md): the same prompt spreads.
    assert routing_of(cluster, g1) == "p2c"
    spread = {instance_of(g1, chat(1, "same question")) for _ in range(30)}
    assert len(spread) >= 2, spread
    bad = httpx.post(
        f"{ctl}/v1/cluster/deployments",
        headers=admin_h(),
        json={"name": "n", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 0, "routing": "random"},
    )
    assert bad.status_code == 422 and "routing" in bad.text, bad.text
    bad = httpx.patch(f"{ctl}/v1/cluster/deployments/m", headers=admin_h(), json={"routing": "nearest"})
    assert bad.status_code == 422, bad.text
    r = httpx.patch(f"{ctl}/v1/cluster/deployments/m", headers=admin_h(), json={"routing": "prefix"})
    assert r.status_code == 200 and r.json()["routing"] == "prefix", r.text
    wait_for(lambda: routing_of(cluster, g1) == "prefix", 15, what="routing prefix in the gateway")
    assert len({instance_of(g1, chat(1, "same question")) for _ in range(10)}) == 1
    r = httpx.patch(f"{ctl}/v1/cluster/deployments/m", headers=admin_h(), json={"routing": "p2c"})
    assert r.status_code == 200, r.text
    wait_for(lambda: routing_of(cluster, g1) == "p2c", 15, what="routing p2c in the gateway")


def test_deploy_routing_flag(cluster: Cluster) -> None:
    ctl = cluster.controller()

    def deploy(name: str, routing: str) -> subprocess.CompletedProcess[str]:
        argv = [
            *MODELFLEET,
            "deploy",
            name,
            "--backend",
            "openai",
            "--model",
            "http://127.0.0.1:9",
            "--replicas",
            "0",
            "--routing",
            routing,
            "--controller",
            ctl,
            "--admin-token",
            ADMIN,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    assert deploy("plain", "p2c").returncode == 0
    bad = deploy("odd", "nearest")
    assert bad.returncode != 0 and "routing" in bad.stdout + bad.stderr
    got = httpx.get(f"{ctl}/v1/cluster/deployments", headers=admin_h(), timeout=10).json()["data"]
    assert [(d["name"], d["routing"]) for d in got] == [("plain", "p2c")]
    routes = httpx.get(f"{ctl}/v1/cluster/routes", headers=admin_h(), timeout=10).json()
    assert [(m["name"], m["routing"]) for m in routes["models"]] == [("plain", "p2c")]
