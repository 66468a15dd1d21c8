"""Request ids and the access log, through a real gateway process in front of scripted
instances: the client's X-Request-ID comes back on a 200, a 404, a 429 and a stream, reaches
the instance, and names the request's line in the access log, which (with --log-format json)
is one JSON object per line with the request's fields."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from tests.gateway.conftest import Cluster, admin_h
from tests.support.procs import wait_for

ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "model",
    "instance",
    "status",
    "attempts",
    "ttfb_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
    "client_disconnected",
}


def chat(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def log_objects(cluster: Cluster) -> list[dict[str, Any]]:
    assert cluster.gateway_proc is not None
    lines = [line for line in cluster.gateway_proc.log_path.read_text().splitlines() if line.strip()]
    out = []
    for line in lines:
        obj = json.loads(line)  # every line, debug ones and third-party ones included, is JSON
        assert {"time", "level", "role", "component", "message"} <= set(obj), obj
        assert obj["role"] == "gateway"
        out.append(obj)
    return out


def access_line(cluster: Cluster, request_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [
            o
            for o in log_objects(cluster)
            if o["component"] == "modelfleet.gateway.access" and o.get("request_id") == request_id
        ]
        return bool(found)

    wait_for(logged, 10, what=f"access log line of {request_id}")
    assert len(found) == 1, found  # one line per request
    return found[0]


def test_request_id_in_and_out_and_in_the_json_access_log(cluster: Cluster) -> None:
    cluster.controller()
    url_a = cluster.upstream("a", "--tokens", "3")
    cluster.start_worker().declare("w1/a", "m", url_a, max_concurrency=1)
    cluster.gateway("--access-log", "--log-format", "json", "--queue-len", "0")
    cluster.wait_routable("m", 1)
    url = f"{cluster.gateway_url}/v1/chat/completions"

    # 200: the id comes back, and the instance got it.
    r = httpx.post(url, json=chat(), headers={"X-Request-ID": "client-200.a:b/c"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "client-200.a:b/c"
    assert r.headers["x-upstream-request-id"] == "client-200.a:b/c"
    line = access_line(cluster, "client-200.a:b/c")
    assert ACCESS_FIELDS <= set(line)
    assert (line["method"], line["path"], line["model"], line["instance"], line["status"], line["attempts"]) == (
        "POST",
        "/v1/chat/completions",
        "m",
        "w1/a",
        200,
        1,
    )
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert 0 < line["ttfb_ms"] <= line["duration_ms"] and line["client_disconnected"] is False
    assert "request_id=client-200.a:b/c" in line["message"] and "status=200" in line["message"]

    # 404: an unknown model; the id still comes back and is logged.
    r = httpx.post(url, json=chat("nope"), headers={"X-Request-ID": "client-404"}, timeout=10)
    assert r.status_code == 404 and r.headers["x-request-id"] == "client-404"
    line = access_line(cluster, "client-404")
    assert (line["status"], line["attempts"], line["instance"]) == (404, 0, None)

    # 429: the only slot is taken and there is no queue.
    cluster.control("a", latency=3.0)
    slow: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: slow.setdefault("r", httpx.post(url, json=chat(), timeout=30, headers={"X-Request-ID": "slow"}))
    )
    t.start()
    wait_for(lambda: cluster.status()["models"][0]["in_flight"] == 1, 10, what="the slot taken")
    r = httpx.post(url, json=chat(), headers={"X-Request-ID": "client-429"}, timeout=10)
    assert r.status_code == 429, r.text
    assert r.headers["x-request-id"] == "client-429"
    assert access_line(cluster, "client-429")["status"] == 429
    t.join(30)
    assert slow["r"].status_code == 200 and slow["r"].headers["x-request-id"] == "slow"
    cluster.control("a", latency=0)

    # A stream carries it too; ttfb is when the first chunk left.
    with httpx.stream("POST", url, json=chat(stream=True), headers={"X-Request-ID": "client-stream"}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-stream"
        body = r.read()
    assert b"[DONE]" in body
    line = access_line(cluster, "client-stream")
    assert line["status"] == 200 and line["ttfb_ms"] is not None

    # The gateway's own refusals carry it too: 400 (not JSON) and 503 (a model with no instance).
    r = httpx.post(url, content=b"{not json", headers={"X-Request-ID": "client-400"}, timeout=10)
    assert r.status_code == 400 and r.headers["x-request-id"] == "client-400"
    assert access_line(cluster, "client-400")["status"] == 400
    dep = httpx.post(
        f"{cluster.controller_urls[0]}/v1/cluster/deployments",
        headers=admin_h(),
        timeout=10,
        json={"name": "idle", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 0},
    )
    assert dep.status_code == 201, dep.text
    wait_for(lambda: "idle" in [m["name"] for m in cluster.status()["models"]], 10, what="idle model known")
    r = httpx.post(url, json=chat("idle"), headers={"X-Request-ID": "client-503"}, timeout=10)
    assert r.status_code == 503 and r.headers["x-request-id"] == "client-503"
    line = access_line(cluster, "client-503")
    assert (line["status"], line["model"], line["attempts"]) == (503, "idle", 0)

    # No id, or one unsafe to log (spaces, too long): the gateway makes one (32 hex digits),
    # a new one each time, and passes that on.
    made = set()
    for sent in (None, "has space", "x" * 129, "semi;colon"):
        headers = {"X-Request-ID": sent} if sent is not None else {}
        r = httpx.post(url, json=chat(), headers=headers, timeout=10)
        rid = r.headers["x-request-id"]
        assert r.status_code == 200 and len(rid) == 32 and int(rid, 16) >= 0, rid
        assert r.headers["x-upstream-request-id"] == rid
        made.add(rid)
    assert len(made) == 4

    # Every other answer of the gateway has one too (not in the access log: only inference is).
    for path in ("/health/live", "/v1/models", "/v1/models/nope", "/metrics"):
        r = httpx.get(f"{cluster.gateway_url}{path}", headers={"X-Request-ID": "other"}, timeout=10)
        assert r.headers["x-request-id"] == "other", path
    assert not [o for o in log_objects(cluster) if o.get("request_id") == "other"]


def test_access_log_is_off_unless_asked(cluster: Cluster) -> None:
    cluster.controller()
    cluster.start_worker().declare("w1/a", "m", cluster.upstream("a"))
    cluster.gateway()  # text format, no --access-log
    cluster.wait_routable("m", 1)
    r = httpx.post(
        f"{cluster.gateway_url}/v1/chat/completions", json=chat(), headers={"X-Request-ID": "quiet-1"}, timeout=10
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "quiet-1"
    assert r.headers["x-upstream-request-id"] == "quiet-1"
    assert cluster.gateway_proc is not None
    text = cluster.gateway_proc.log_path.read_text()
    assert "quiet-1" not in text
    assert "modelfleet.gateway.access" not in text
