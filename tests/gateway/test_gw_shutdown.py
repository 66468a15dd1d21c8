"""A gateway stopped with SIGTERM (a rolling update, `podman stop`, Ctrl-C) fails no request:
readiness turns off at once, the port keeps serving for the drain delay, then it closes and
the requests still in flight finish."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.gateway.conftest import Cluster, two_instance_cluster
from tests.support.procs import wait_for

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_sigterm_turns_readiness_off_then_closes_the_port_and_finishes_requests_in_flight(cluster: Cluster) -> None:
    delay = 2.0
    two_instance_cluster(cluster, "m", "--shutdown-delay-s", str(delay), upstream_args=("--latency", "0.2"))
    url = cluster.gateway_url
    assert httpx.get(f"{url}/health/ready", timeout=5).status_code == 200
    # A request that is still being answered when the port closes.
    cluster.control("a", latency=delay + 2.0)
    cluster.control("b", latency=delay + 2.0)
    slow: dict[str, object] = {}

    def send_slow() -> None:
        try:
            slow["status"] = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=30).status_code
        except httpx.HTTPError as exc:
            slow["error"] = repr(exc)

    t = threading.Thread(target=send_slow)
    t.start()
    wait_for(lambda: sum(m["in_flight"] for m in cluster.status()["models"]) == 1, 5, what="the slow request in flight")
    cluster.control("a", latency=0.05)
    cluster.control("b", latency=0.05)

    assert cluster.gateway_proc is not None
    t_term = time.monotonic()
    cluster.gateway_proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    # Readiness off at once, while new requests are still served.
    ready = wait_for(
        lambda: (r := httpx.get(f"{url}/health/ready", timeout=2)).status_code == 503 and r,
        1.0,
        interval=0.02,
        what="readiness to turn off",
    )
    assert ready.json()["draining"] is True
    served_while_draining = 0
    while time.monotonic() - t_term < delay - 0.5:
        r = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=10)
        assert r.status_code == 200, r.text
        served_while_draining += 1
    assert served_while_draining > 0
    # After the delay the port closes: a new connection is refused, the slow request goes on.
    wait_for(lambda: _refused(url), delay + 2, interval=0.05, what="the port to close")
    assert t.is_alive(), "the slow request ended before the port closed"
    t.join(30)
    assert slow == {"status": 200}, f"{slow}\n{cluster.log_tail()}"
    assert cluster.gateway_proc.popen.wait(15) is not None  # type: ignore[union-attr]
    assert "not ready; serving 2.0 s more" in cluster.gateway_proc.log_tail(80)


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health/live", timeout=1)
    except httpx.ConnectError:
        return True
    return False
