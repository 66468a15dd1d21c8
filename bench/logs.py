"""What the gateway's access log costs, side by side in one run: three gateway processes on
the same scripted instance, with the access log off, on (text) and on (JSON), each writing
its log to a file as a deployed gateway would. Request ids are on in all three (they always
are); the difference is the log line.

Rounds alternate the three (off, text, json, off, text, json…) so that a machine whose load
changes during the run (it is shared) weighs on each alike. Measured per round: requests per
second and latency (p50, p99) from a light asyncio load generator (aiohttp, in this process;
its own CPU time is reported), and the gateway process's CPU time per request (psutil):
the cost that does not depend on whether the instance or the load generator is the
bottleneck.

    python bench/logs.py [--duration 4] [--rounds 3] [--concurrency 16]

Prints a table; writes bench/results/logs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "logs.json"
console = Console(width=None if sys.stdout.isatty() else 150)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MODES = {
    "off": ["--no-access-log"],
    "text": ["--access-log", "--log-format", "text"],
    "json": ["--access-log", "--log-format", "json"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, body: dict[str, Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json=body, timeout=2) if body else httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")


def snapshot(work: Path, upstream_port: int) -> Path:
    """A route snapshot with model ``m`` on the scripted instance: no controller needed."""
    routes = {
        "revision": 1,
        "store_time": time.time(),
        "controller_id": "bench",
        "heartbeat_ttl": 6.0,
        "models": [
            {
                "name": "m",
                "instances": [
                    {
                        "id": "m-0",
                        "worker_id": "bench",
                        "endpoint": f"http://127.0.0.1:{upstream_port}",
                        "weight": 100,
                        "max_concurrency": 100000,
                        "enabled": True,
                        "state": "ready",
                    }
                ],
            }
        ],
        "api_keys": [],
    }
    path = work / "routes.json"
    path.write_text(json.dumps({"fetched_at": time.time(), "routes": routes}))
    return path


async def load(url: str, concurrency: int, duration: float) -> tuple[int, int, list[float]]:
    """``concurrency`` clients in a closed loop for ``duration`` s: (ok, errors, latencies)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    payload = json.dumps(BODY).encode()
    stop = time.perf_counter() + duration

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            async with session.post(
                url, data=payload, headers={"content-type": "application/json", "x-request-id": f"bench-{i}-{n}"}
            ) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
            n += 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    return len(latencies), errors, latencies


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description="The access log's cost on the gateway, side by side.")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mf-bench-logs-"))
    up_port = free_port()
    ports = {m: free_port() for m in MODES}
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(work / f"{name}.log", "wb")
        path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        p = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        log.close()
        procs.append(p)
        return p

    load_before = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    self_cpu = 0.0
    try:
        start(
            "upstream",
            [
                sys.executable,
                "-m",
                "tests.fakes.scripted_upstream",
                "--port",
                str(up_port),
                "--name",
                "up",
                "--tokens",
                "4",
            ],
        )
        snap = snapshot(work, up_port)
        gw = {
            m: start(
                f"gateway-{m}",
                [
                    sys.executable,
                    "-m",
                    "modelfleet.gateway",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports[m]),
                    "--snapshot-path",
                    str(snap),
                    "--controller",
                    "",
                    *MODES[m],
                ],
            )
            for m in MODES
        }
        wait_http(f"http://127.0.0.1:{up_port}/health", 60)
        for m in MODES:
            wait_http(f"http://127.0.0.1:{ports[m]}/v1/chat/completions", 60, BODY)
        for rnd in range(a.rounds):
            for m in MODES:
                url = f"http://127.0.0.1:{ports[m]}/v1/chat/completions"
                asyncio.run(load(url, a.concurrency, 0.5))  # warm connections
                proc = psutil.Process(gw[m].pid)
                c0, s0 = proc.cpu_times(), time.process_time()
                t0 = time.perf_counter()
                ok, errors, lat = asyncio.run(load(url, a.concurrency, a.duration))
                elapsed = time.perf_counter() - t0
                c1, s1 = proc.cpu_times(), time.process_time()
                self_cpu += s1 - s0
                cpu = (c1.user + c1.system) - (c0.user + c0.system)
                row = {
                    "rps": ok / elapsed,
                    "p50_ms": pct(lat, 0.5),
                    "p99_ms": pct(lat, 0.99),
                    "ok": ok,
                    "errors": errors,
                    "gateway_cpu_us_per_request": cpu / max(ok, 1) * 1e6,
                }
                results[m].append(row)
                console.print(
                    f"round {rnd + 1} {m:4} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                    f"p99 {row['p99_ms']:6.2f} ms  gateway CPU {row['gateway_cpu_us_per_request']:6.0f} "
                    f"µs/request  errors {errors}"
                )
        lines = {
            m: sum(
                1
                for line in (work / f"gateway-{m}.log").read_text().splitlines()
                if "modelfleet.gateway.access" in line
            )
            for m in MODES
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    load_after = os.getloadavg()

    summary: dict[str, dict[str, float]] = {}
    for m, rows in results.items():
        summary[m] = {
            k: round(statistics.median(r[k] for r in rows), 3)
            for k in ("rps", "p50_ms", "p99_ms", "gateway_cpu_us_per_request")
        }
        summary[m]["errors"] = sum(r["errors"] for r in rows)
        summary[m]["access_log_lines"] = lines[m]
    base = summary["off"]
    for m in MODES:
        s = summary[m]
        s["rps_vs_off"] = round(s["rps"] / base["rps"], 3)
        s["cpu_per_request_vs_off"] = round(s["gateway_cpu_us_per_request"] / base["gateway_cpu_us_per_request"], 3)
        s["added_cpu_us_per_request"] = round(s["gateway_cpu_us_per_request"] - base["gateway_cpu_us_per_request"], 1)

    t = Table(
        title=f"Access log cost (median of {a.rounds} alternating rounds, {a.duration:g} s each, "
        f"concurrency {a.concurrency})"
    )
    for col in (
        "access log",
        "req/s",
        "× off",
        "p50 ms",
        "p99 ms",
        "gateway CPU µs/req",
        "× off",
        "added µs/req",
        "log lines",
        "errors",
    ):
        t.add_column(col, justify="left" if col == "access log" else "right")
    for m, s in summary.items():
        t.add_row(
            m,
            f"{s['rps']:.0f}",
            f"{s['rps_vs_off']:.3f}",
            f"{s['p50_ms']:.2f}",
            f"{s['p99_ms']:.2f}",
            f"{s['gateway_cpu_us_per_request']:.0f}",
            f"{s['cpu_per_request_vs_off']:.3f}",
            f"{s['added_cpu_us_per_request']:.1f}",
            str(s["access_log_lines"]),
            str(s["errors"]),
        )
    console.print(t)
    elapsed = time.monotonic() - started
    console.print(f"load generator (this process): {self_cpu:.1f} s CPU over {a.rounds * len(MODES)} runs")
    out = {
        "benchmark": "logs",
        "command": "python " + " ".join(sys.argv),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in load_after],
        },
        "settings": {"duration_s": a.duration, "rounds": a.rounds, "concurrency": a.concurrency},
        "elapsed_s": round(elapsed, 1),
        "load_generator_cpu_s": round(self_cpu, 2),
        "notes": "Three gateways (access log off / text / json) on one scripted instance (aiohttp, 4 tokens), "
        "routing from a snapshot, logging to files; rounds alternate the three. The load generator "
        "(aiohttp, closed loop) runs in the benchmark's process on the same cores, so req/s is "
        "bounded by the machine, not the gateway: gateway CPU µs per request is the figure to read.",
        "summary": summary,
        "rounds": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
