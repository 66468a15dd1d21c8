"""Autoscaling, side by side in one run (issue 12): a deployment with a fixed, peak-sized
replica count against an autoscaled one, both under the same load trace at the same time:
idle, a burst to 8x one replica's capacity, a plateau, idle again.

The short version, on the scripted upstream (tests/fakes/scripted_upstream.py, fixed
latency): every replica attaches to it (backend ``openai``) and the gateway enforces each
replica's max_concurrency, so one replica is one unit of capacity (``--slots`` requests at
once, ``--latency`` s each) and a replica starts in about a heartbeat (no model load: the
cold start of a real model is measured by tests/autoscale and reported in docs/autoscaling.md).
Real processes: a controller (SQLite), a worker agent, a gateway.

Load: closed-loop clients (threads, httpx), one request after the other; a 429 or 503 is
counted and the client pauses 0.2 s. Costs about one core at the burst.

    python bench/autoscale.py [--latency 0.5] [--slots 2] [--scale 1.0]

Prints a table; writes bench/results/autoscale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "autoscale.json"
PY = sys.executable
ADMIN, JOIN = "bench-admin", "bench-join"
H = {"authorization": f"Bearer {ADMIN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "MODELFLEET_HOME": str(tmp / "home"),
            "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, name: str, args: list[str], ready: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs.append(
            subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(ready, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{name} did not start; see {self.tmp / f'{name}.log'}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Clients:
    """Closed-loop clients for one model; the count follows the trace."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.want = 0
        self.statuses: Counter[int | str] = Counter()
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()

    def set(self, n: int) -> None:
        self.want = n
        while len(self.threads) < n:
            t = threading.Thread(target=self._run, args=(len(self.threads),), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, index: int) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with httpx.Client(timeout=120) as c:
            while not self.done.is_set():
                if index >= self.want:
                    time.sleep(0.05)
                    continue
                t0 = time.perf_counter()
                try:
                    status: int | str = c.post(f"{self.url}/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                dt = time.perf_counter() - t0
                with self.lock:
                    self.statuses[status] += 1
                    if status == 200:
                        self.latencies.append(dt)
                if status in (429, 503):
                    time.sleep(0.2)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(150)


def models(ctl: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in httpx.get(f"{ctl}/v1/cluster/models", headers=H, timeout=5).json()["data"]}


def routable(gw: str) -> dict[str, int]:
    st = httpx.get(f"{gw}/v1/gateway/status", headers=H, timeout=5).json()
    return {m["name"]: sum(1 for i in m["instances"] if i["enabled"]) for m in st["models"]}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=0.5, help="seconds per request at the upstream")
    ap.add_argument("--slots", type=int, default=2, help="max_concurrency of one replica")
    ap.add_argument("--peak", type=int, default=8, help="burst = this many replicas' worth; fixed = this many")
    ap.add_argument("--scale", type=float, default=1.0, help="stretch every phase of the trace")
    args = ap.parse_args()
    # (phase, seconds, clients per model)
    slots, peak, k = args.slots, args.peak, args.scale
    trace = [
        ("idle", 6 * k, 0),
        ("burst", 20 * k, peak * slots),
        ("plateau", 12 * k, peak * slots // 2),
        ("idle", 14 * k, 0),
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-autoscale-"))
    c = Cluster(tmp)
    cport, wport, gport, uport = free_port(), free_port(), free_port(), free_port()
    ctl, gw, up = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{uport}"
    try:
        c.start(
            "upstream",
            [PY, "-m", "tests.fakes.scripted_upstream", "--port", str(uport), "--latency", str(args.latency)],
            f"{up}/health",
        )
        c.start(
            "controller",
            [
                PY,
                "-m",
                "modelfleet.cli",
                "controller",
                "--store",
                f"sqlite:///{tmp / 'state.db'}",
                "--host",
                "127.0.0.1",
                "--port",
                str(cport),
                "--admin-token",
                ADMIN,
                "--join-token",
                JOIN,
                "--heartbeat-interval",
                "0.5",
                "--lease-ttl",
                "3",
                "--load-report-ttl",
                "3",
            ],
            f"{ctl}/health/ready",
        )
        c.start(
            "worker",
            [
                PY,
                "-m",
                "modelfleet.cli",
                "worker",
                "--controller",
                ctl,
                "--join-token",
                JOIN,
                "--name",
                "w1",
                "--host",
                "127.0.0.1",
                "--address",
                "127.0.0.1",
                "--port",
                str(wport),
                "--heartbeat-interval",
                "0.5",
            ],
            f"http://127.0.0.1:{wport}/health/live",
        )
        c.start(
            "gateway",
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
                "--queue-wait-s",
                "30",
                "--queue-len",
                "1000",
                "--log-level",
                "warning",
            ],
            f"{gw}/health/live",
        )
        base = {"backend": "openai", "source": up, "max_concurrency": slots}
        policy = {
            "min_replicas": 1,
            "max_replicas": peak,
            "target_ongoing": slots,
            "window_s": 3,
            "up_delay_s": 1,
            "down_delay_s": 5,
            "max_step": 4,
        }
        for body in ({**base, "name": "fixed", "replicas": peak}, {**base, "name": "auto", "autoscale": policy}):
            r = httpx.post(f"{ctl}/v1/cluster/deployments", json=body, headers=H, timeout=10)
            assert r.status_code == 201, r.text
        deadline = time.monotonic() + 60
        while routable(gw) != {"fixed": peak, "auto": 1}:
            if time.monotonic() > deadline:
                raise SystemExit(f"replicas not routable: {routable(gw)}")
            time.sleep(0.2)

        clients = {name: Clients(gw, name) for name in ("fixed", "auto")}
        replica_s: Counter[str] = Counter()
        added_at: float | None = None
        burst_at = 0.0
        timeline = []
        t_start = time.monotonic()
        for phase, seconds, n in trace:
            for cl in clients.values():
                cl.set(n)
            if phase == "burst":
                burst_at = time.monotonic()
            end = time.monotonic() + seconds
            last = time.monotonic()
            while time.monotonic() < end:
                time.sleep(0.5)
                now = time.monotonic()
                ms = models(ctl)
                for name in clients:
                    replica_s[name] += ms[name]["instances"] * (now - last)
                last = now
                r = routable(gw)
                if phase == "burst" and added_at is None and r.get("auto", 0) > 1:
                    added_at = now - burst_at
                timeline.append((round(now - t_start, 1), phase, ms["auto"]["replicas"], r.get("auto", 0)))
        for cl in clients.values():
            cl.stop()

        # First token from zero: the autoscaled deployment goes to zero, then one request.
        policy0 = {**policy, "min_replicas": 0, "idle_after_s": 3}
        r = httpx.patch(f"{ctl}/v1/cluster/deployments/auto", json={"autoscale": policy0}, headers=H, timeout=10)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while models(ctl)["auto"]["instances"] > 0:
            if time.monotonic() > deadline:
                raise SystemExit("auto did not scale to zero")
            time.sleep(0.2)
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        t0 = time.perf_counter()
        first_from_zero = None
        with httpx.stream("POST", f"{gw}/v1/chat/completions", json=body, timeout=120) as resp:
            zero_status = resp.status_code
            for _ in resp.iter_bytes():
                first_from_zero = first_from_zero or time.perf_counter() - t0
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{gw}/v1/chat/completions", json={**body, "model": "fixed"}, timeout=120) as resp:
            for _ in resp.iter_bytes():
                warm = time.perf_counter() - t0
                break
    finally:
        c.stop()

    rows = []
    for name, cl in clients.items():
        st = cl.statuses
        errors = sum(v for s, v in st.items() if s not in (200, 429, 503))
        rows.append(
            {
                "deployment": name,
                "served": st[200],
                "429": st[429],
                "503": st[503],
                "errors": errors,
                "p50_s": round(pct(cl.latencies, 0.5) or 0, 3),
                "p99_s": round(pct(cl.latencies, 0.99) or 0, 3),
                "mean_s": round(statistics.fmean(cl.latencies), 3) if cl.latencies else None,
                "replica_seconds": round(replica_s[name], 1),
            }
        )
    saving = 1 - rows[1]["replica_seconds"] / rows[0]["replica_seconds"]
    result = {
        "bench": "autoscale",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "upstream": "scripted (tests/fakes/scripted_upstream.py)",
        "latency_s": args.latency,
        "slots": slots,
        "trace": [{"phase": p, "seconds": s, "clients": n} for p, s, n in trace],
        "rows": rows,
        "replica_seconds_saved": round(saving, 3),
        "burst_to_added_capacity_s": None if added_at is None else round(added_at, 2),
        "first_token_from_zero_s": None if first_from_zero is None else round(first_from_zero, 3),
        "first_token_from_zero_status": zero_status,
        "first_token_warm_s": round(warm, 3),
        "timeline_auto": timeline,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(
        f"{'deployment':<10} {'served':>7} {'429':>5} {'503':>5} {'errors':>6} {'p50 s':>7} {'p99 s':>7} "
        f"{'replica-s':>10}"
    )
    for r in rows:
        print(
            f"{r['deployment']:<10} {r['served']:>7} {r['429']:>5} {r['503']:>5} {r['errors']:>6} "
            f"{r['p50_s']:>7} {r['p99_s']:>7} {r['replica_seconds']:>10}"
        )
    print(
        f"replica-seconds saved by autoscaling: {saving:.0%}; burst to added capacity: "
        f"{result['burst_to_added_capacity_s']} s; first token from zero: {result['first_token_from_zero_s']} s "
        f"(HTTP {zero_status}), warm: {result['first_token_warm_s']} s"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
