"""The gateway's HTTP surface against a real controller and scripted upstreams: the error
matrix, the official openai client (streaming included), headers, models, health, status,
metrics, the console hooks and the cluster pass-through."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.gateway.conftest import ADMIN, Cluster, admin_h, two_instance_cluster
from tests.support.procs import wait_for


@pytest.fixture
def gw(cluster: Cluster) -> Cluster:
    two_instance_cluster(cluster, "m", "--max-body-bytes", "65536")
    # A model that is known (deployed) but has no instance: 503, not 404.
    r = httpx.post(f"{cluster.controller_urls[0]}/v1/cluster/deployments", headers=admin_h(),
                   json={"name": "idle", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 0})
    assert r.status_code == 201, r.text
    wait_for(lambda: "idle" in [m["name"] for m in cluster.status()["models"]], 10, what="idle model known")
    return cluster


def chat(model: str = "m", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def test_error_matrix(gw: Cluster) -> None:
    url = f"{gw.gateway_url}/v1/chat/completions"
    cases = [
        (httpx.post(url, json=chat("nope")), 404, "model_not_found"),
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
        (httpx.post(url, json={"messages": []}), 400, "invalid_request"),
        (httpx.post(url, json=[1, 2]), 400, "invalid_request"),
        (httpx.post(url, json=chat(pad="x" * 70000)), 413, "request_too_large"),
        (httpx.post(url, json=chat("idle")), 503, "no_healthy_instance"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (status, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == code and err["message"]
        assert r.headers["x-modelfleet-instance"] == "-"
        float(r.headers["x-modelfleet-overhead-ms"])
    # A body over the limit sent without Content-Length (chunked) is refused too.
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 10000

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(url).status_code == 405


def test_openai_client_chat_stream_completions_embeddings(gw: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{gw.gateway_url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.startswith("tok0") and r.usage.completion_tokens == 8

    raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-modelfleet-instance"] in ("w1/a", "w1/b")
    assert 0 <= float(raw.headers["x-modelfleet-overhead-ms"]) < 1000

    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}) if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "".join(f"tok{i} " for i in range(8))

    c = client.completions.create(model="m", prompt="say something")
    assert c.choices[0].text.startswith("tok0")
    streamed = "".join(x.choices[0].text for x in client.completions.create(model="m", prompt="p", stream=True)
                       if x.choices)
    assert streamed.startswith("tok0 ")

    e = client.embeddings.create(model="m", input=["a", "b c"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8

    models = {m.id for m in client.models.list()}
    assert models == {"m", "idle"}

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_health_status_metrics_and_console_hooks(gw: Cluster) -> None:
    g = gw.gateway_url
    assert httpx.get(f"{g}/health/live").json()["live"] is True
    ready = httpx.get(f"{g}/health/ready").json()
    assert ready["ready"] is True and ready["route_table"]["state"] == "fresh"
    for _ in range(5):
        httpx.post(f"{g}/v1/chat/completions", json=chat())
    httpx.post(f"{g}/v1/chat/completions", json=chat("nope"))

    assert httpx.get(f"{g}/v1/gateway/status").status_code == 401  # admin token set: protected
    st = gw.status()
    assert st["route_table"]["state"] == "fresh" and st["route_table"]["controller"] == gw.controller_urls[0]
    m = next(x for x in st["models"] if x["name"] == "m")
    assert {i["id"] for i in m["instances"]} == {"w1/a", "w1/b"}
    assert sum(b["requests"] for b in m["recent"]) == 5

    text = httpx.get(f"{g}/metrics").text
    assert 'modelfleet_gateway_requests_total{model="m",status="200"} 5.0' in text
    assert 'modelfleet_gateway_requests_total{model="-",status="404"} 1.0' in text
    assert 'modelfleet_gateway_tokens_total{direction="out",model="m"} 40.0' in text
    assert "modelfleet_gateway_instance_in_flight" in text and "modelfleet_gateway_route_table_age_seconds" in text
    assert "modelfleet_gateway_request_seconds_bucket" in text

    # The cluster pass-through forwards the browser's own Authorization, never the gateway's.
    assert httpx.get(f"{g}/v1/cluster/workers").status_code == 401
    r = httpx.get(f"{g}/v1/cluster/workers", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "w1"
    r = httpx.post(f"{g}/v1/cluster/deployments", headers=admin_h(),
                   json={"name": "via-gw", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 0})
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{g}/v1/cluster/deployments/via-gw", headers=admin_h()).status_code == 204

    root = httpx.get(f"{g}/")
    assert root.status_code == 200
    assert httpx.get(f"{g}/ui/definitely-missing.js").status_code == 404


def test_several_processes_share_the_port_and_sum_their_metrics(cluster: Cluster) -> None:
    two_instance_cluster(cluster, "m", "--processes", "2")
    g = cluster.gateway_url
    pids = set()
    with httpx.Client() as client:  # keep-alive off: new connections spread over the processes
        for _ in range(40):
            r = client.post(f"{g}/v1/chat/completions", json=chat(), headers={"connection": "close"})
            assert r.status_code == 200
        for _ in range(20):
            pids.add(client.get(f"{g}/health/live", headers={"connection": "close"}).json()["pid"])
    assert len(pids) == 2, "SO_REUSEPORT spread connections over both processes"

    def total() -> float:
        text = httpx.get(f"{g}/metrics", headers={"connection": "close"}).text
        line = next(x for x in text.splitlines() if x.startswith('modelfleet_gateway_requests_total{model="m"'))
        return float(line.split()[-1])

    assert {total() for _ in range(6)} == {40.0}  # whichever process answers the scrape
    # Each process copies its live gauges to the shared files once a second: the instance's
    # gauge is there by the next copy after the route table reached both processes.
    wait_for(lambda: 'modelfleet_gateway_instance_in_flight{instance="w1/a",model="m"}'
             in httpx.get(f"{g}/metrics").text, 5, what="the per-instance live gauge")
    status = cluster.status()
    assert status["processes"] == 2 and status["process"] in (0, 1)


def test_several_processes_publish_live_gauges_without_errors(cluster: Cluster) -> None:
    """Issue 16: with --processes 2 the live gauges (declared with their label names) reach
    /metrics from whichever process answers, and nothing is logged as an error."""
    two_instance_cluster(cluster, "m", "--processes", "2", "--queue-wait-s", "30",
                         upstream_args=("--latency", "4"), max_concurrency=1)
    g = cluster.gateway_url
    # 2 instances x 1 slot, but each of 2 processes keeps at least one slot per instance: at
    # most 4 admitted at once; 8 requests leave some in flight and some queued.
    results: list[int] = []

    def one() -> None:
        results.append(httpx.post(f"{g}/v1/chat/completions", json=chat(), timeout=60,
                                  headers={"connection": "close"}).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()

    def gauge(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + '{model="m"}'):
                return float(line.split()[-1])
        return 0.0

    def busy_and_queued() -> bool:
        text = httpx.get(f"{g}/metrics", headers={"connection": "close"}).text
        return gauge(text, "modelfleet_gateway_in_flight") > 0 and gauge(text, "modelfleet_gateway_queued") > 0

    wait_for(busy_and_queued, 10, what="non-zero in-flight and queued gauges from the shared metrics")
    text = httpx.get(f"{g}/metrics").text
    revision = next(x for x in text.splitlines() if x.startswith("modelfleet_gateway_route_table_revision"))
    assert float(revision.split()[-1]) >= 0
    for t in threads:
        t.join(60)
    assert results == [200] * 8
    log = cluster.gateway_proc.log_path.read_text(errors="replace") if cluster.gateway_proc else ""
    assert "Traceback" not in log and "publishing metrics failed" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


def test_bad_requests_get_400_naming_the_field_and_never_reach_an_instance(gw: Cluster) -> None:
    g = gw.gateway_url
    before = sum(gw.upstream_stats(n)["requests"] for n in ("a", "b"))
    cases = [
        ("/v1/chat/completions", {"model": "m", "messages": "hello"}, "messages"),
        ("/v1/chat/completions", chat(max_tokens="16"), "max_tokens"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", chat(max_tokens=-1), "max_tokens"),
        ("/v1/chat/completions", chat(stream="yes"), "stream"),
        ("/v1/completions", {"model": "m", "prompt": {"text": "x"}}, "prompt"),
        ("/v1/embeddings", {"model": "m", "input": [1, "a"]}, "input[1]"),
    ]
    for path, body, param in cases:
        r = httpx.post(f"{g}{path}", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
        assert r.headers["x-modelfleet-instance"] == "-"
    assert sum(gw.upstream_stats(n)["requests"] for n in ("a", "b")) == before  # no instance saw any
    text = httpx.get(f"{g}/metrics").text
    assert f'modelfleet_gateway_requests_total{{model="m",status="400"}} {len(cases)}.0' in text
    # Unknown fields (backends' own extensions) pass through.
    assert httpx.post(f"{g}/v1/chat/completions", json=chat(top_k=40, min_p=0.1)).status_code == 200


def test_an_instance_answering_500_is_passed_through_and_never_ejected(gw: Cluster) -> None:
    """A 500 is often the request's own fault (a runner's validation error): passing it on
    and not counting it keeps one poison request from ejecting every instance in turn."""
    for name in ("a", "b"):
        gw.control(name, status=500, fail_count=-1)
    url = f"{gw.gateway_url}/v1/chat/completions"
    for _ in range(8):  # well past eject_after (3) on each instance
        r = httpx.post(url, json=chat())
        assert r.status_code == 500 and "scripted failure" in r.json()["error"]["message"]
    for iid in ("w1/a", "w1/b"):
        view = gw.instance_view(iid)
        assert view is not None and not view["ejected"] and view["consecutive_failures"] == 0, view
    assert sum(gw.upstream_stats(n)["failed_on_purpose"] for n in ("a", "b")) == 8  # one attempt each, no retry
    for name in ("a", "b"):
        gw.control(name, status=200)
    assert httpx.post(url, json=chat()).status_code == 200


def raw_get(base: str, raw_path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET with the path sent exactly as given (HTTP clients normalize dot segments)."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    lines = [f"GET {raw_path} HTTP/1.1", f"Host: {host}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_cluster_passthrough_forwards_only_paths_under_v1_cluster(gw: Cluster) -> None:
    g = gw.gateway_url
    for raw in ("/v1/cluster/..%2f..%2fopenapi.json", "/v1/cluster/..%2f..%2fmetrics", "/v1/cluster/../../metrics",
                "/v1/cluster/%2e%2e/%2e%2e/openapi.json", "/v1/cluster/..%5c..%5cmetrics", "/v1/cluster/workers/",
                "/v1/cluster//workers", "/v1/cluster/./workers", "/v1/cluster/instances/w1%2F..%2F..%2F..%2Fmetrics"):
        status, body = raw_get(g, raw, admin_h())
        assert status == 400, (raw, status, body[:200])
        assert b"modelfleet_controller" not in body and b"openapi" not in body
        assert json.loads(body)["error"]["code"] == "invalid_path"
    # What the console and the CLI call still works, instance ids with "/" included.
    status, body = raw_get(g, "/v1/cluster/instances/w1%2Fa", admin_h())
    assert status == 200 and json.loads(body)["id"] == "w1/a", body
    status, body = raw_get(g, "/v1/cluster/instances?model=m", admin_h())
    assert status == 200 and {i["id"] for i in json.loads(body)["data"]} == {"w1/a", "w1/b"}
    r = httpx.post(f"{g}/v1/cluster/instances/w1%2Fb/drain", headers=admin_h())
    assert r.status_code == 200 and r.json()["id"] == "w1/b" and r.json()["enabled"] is False
