"""What the gateway's request checks cost (validate.py), side by side in one run.

1. Micro: for representative bodies, the time to check the parsed body against its
   endpoint's schema, next to the time of the orjson parse the proxy already does for the
   same body (the ratio is what matters on a shared machine).
2. End to end (``--baseline-src DIR``): a gateway from this tree and one from DIR (e.g. the
   main branch's ``src``, without the checks and the client timeouts) in front of the same
   scripted upstream, routing from the same route snapshot; sequential requests at
   concurrency 1 over one keep-alive connection each, 20 at a time to each in turn; p50/p99
   and the difference. This tree runs twice: the gap between its two copies is the noise.

    python bench/validate.py [--baseline-src /work/main/src] [--batches 150]

Prints a table; writes bench/results/validate.json.
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
import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from modelfleet.gateway.validate import CHAT, COMPLETIONS, EMBEDDINGS, check  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "validate.json"
console = Console(width=None if sys.stdout.isatty() else 150)

BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat, 1 message": (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    "chat, 20 turns, tools, sampling": (
        CHAT,
        {
            "model": "m",
            "max_tokens": 256,
            "temperature": 0.7,
            "top_p": 0.9,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": ["\n\n", "###"],
            "seed": 7,
            "tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {}}} for i in range(4)],
            "messages": [{"role": "system", "content": "You are terse."}]
            + [{"role": "user" if i % 2 == 0 else "assistant", "content": "some words " * 40} for i in range(20)],
        },
    ),
    "completions, 8k token ids": (COMPLETIONS, {"model": "m", "prompt": list(range(8192)), "max_tokens": 16}),
    "embeddings, 64 strings": (EMBEDDINGS, {"model": "m", "input": ["a sentence to embed " * 8] * 64}),
}


def per_call_us(fn: Any, arg: Any, budget_s: float = 0.3) -> float:
    """Median over 5 batches of the time per call, in microseconds."""
    n = 1
    while True:  # batch size: about budget/5 per batch
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        if time.perf_counter() - t0 > budget_s / 5:
            break
        n *= 2
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def micro() -> list[dict[str, Any]]:
    rows = []
    for name, (endpoint, body) in BODIES.items():
        raw = orjson.dumps(body)
        assert check(endpoint, body) is None, name
        parse = per_call_us(orjson.loads, raw)
        checked = per_call_us(lambda b, e=endpoint: check(e, b), body)
        rows.append(
            {
                "body": name,
                "bytes": len(raw),
                "parse_us": round(parse, 2),
                "check_us": round(checked, 2),
                "check_vs_parse": round(checked / parse, 2),
            }
        )
    return rows


# -- end to end -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready within {timeout:.0f} s")


async def interleaved(targets: dict[str, str], body: bytes, batches: int, batch: int) -> dict[str, list[float]]:
    """Sequential requests (concurrency 1), ``batch`` at a time to each target in turn (the
    order rotating), each over its own keep-alive connection: the machine's noise falls on
    all alike."""
    times: dict[str, list[float]] = {t: [] for t in targets}
    clients = {t: httpx.AsyncClient(timeout=10) for t in targets}
    try:
        order = list(targets)
        for b in range(batches + 1):
            order = order[1:] + order[:1]  # each target takes each place in turn: no position bias
            for t in order:
                url = targets[t]
                for _ in range(batch):
                    t0 = time.perf_counter()
                    r = await clients[t].post(url, content=body, headers={"content-type": "application/json"})
                    if r.status_code != 200:
                        raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")
                    if b:  # the first batch warms up
                        times[t].append(time.perf_counter() - t0)
    finally:
        for c in clients.values():
            await c.aclose()
    return times


def e2e(baseline_src: Path, batches: int, work: Path) -> list[dict[str, Any]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str], pythonpath: str) -> None:
        log = open(work / f"{name}.log", "wb")
        procs.append(
            subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": pythonpath},
            )
        )
        log.close()

    try:
        up = free_port()
        start(
            "upstream",
            [sys.executable, "-m", "tests.fakes.scripted_upstream", "--port", str(up), "--tokens", "8"],
            f"{ROOT / 'src'}:{ROOT}",
        )
        wait_http(f"http://127.0.0.1:{up}/health")
        routes = {
            "revision": 1,
            "controller_id": "bench",
            "heartbeat_ttl": 6.0,
            "api_keys": [],
            "models": [
                {
                    "name": "m",
                    "instances": [
                        {
                            "id": "m-0",
                            "worker_id": "b",
                            "endpoint": f"http://127.0.0.1:{up}",
                            "weight": 100,
                            "max_concurrency": 1000,
                            "enabled": True,
                            "state": "ready",
                        }
                    ],
                }
            ],
        }
        targets = {}
        # The same tree twice: the difference between those two is the noise of this run.
        for name, src in (
            ("with checks", ROOT / "src"),
            ("with checks (again)", ROOT / "src"),
            ("baseline", baseline_src),
        ):
            port = free_port()
            snap = work / f"routes-{port}.json"
            snap.write_text(json.dumps({"fetched_at": time.time(), "routes": routes}))
            start(
                f"gw-{port}",
                [
                    sys.executable,
                    "-m",
                    "modelfleet.gateway",
                    "--port",
                    str(port),
                    "--host",
                    "127.0.0.1",
                    "--snapshot-path",
                    str(snap),
                    "--log-level",
                    "warning",
                ],
                str(src),
            )
            wait_http(f"http://127.0.0.1:{port}/health/ready")
            targets[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = orjson.dumps(BODIES["chat, 20 turns, tools, sampling"][1] | {"stream": False})
        times = asyncio.run(interleaved(targets, body, batches, 20))
        rows = []
        for t, xs in times.items():
            xs.sort()
            rows.append(
                {
                    "target": t,
                    "requests": len(xs),
                    "p50_ms": round(xs[len(xs) // 2] * 1000, 3),
                    "p99_ms": round(xs[int(len(xs) * 0.99)] * 1000, 3),
                }
            )
        return rows
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-src", type=Path, help="src folder of the gateway to compare with (no checks)")
    ap.add_argument("--batches", type=int, default=150, help="batches of 20 sequential requests per target")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    started = time.time()
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python", "bench/validate.py", *sys.argv[1:]]),
        "micro": micro(),
    }
    t = Table(title="request checks (validate.py) vs the JSON parse the proxy already does")
    for c in ("body", "bytes", "parse µs", "check µs", "check / parse"):
        t.add_column(c, justify="left" if c == "body" else "right")
    for r in result["micro"]:
        t.add_row(
            r["body"], str(r["bytes"]), f"{r['parse_us']:.2f}", f"{r['check_us']:.2f}", f"{r['check_vs_parse']:.2f}"
        )
    console.print(t)
    if a.baseline_src:
        with tempfile.TemporaryDirectory(prefix="bench-validate-") as work:
            rows = e2e(a.baseline_src.resolve(), a.batches, Path(work))
        result["e2e"] = rows
        base = next(r for r in rows if r["target"] == "baseline")
        t = Table(title="through the gateway, concurrency 1 (chat, 20 turns), same upstream, interleaved")
        for c in ("target", "requests", "p50 ms", "p99 ms", "p50 vs baseline ms"):
            t.add_column(c, justify="left" if c == "target" else "right")
        for r in rows:
            t.add_row(
                r["target"],
                str(r["requests"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['p50_ms'] - base['p50_ms']:+.3f}",
            )
        console.print(t)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["seconds"] = round(time.time() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(
        f"wrote {a.out} (load average {result['load_average'][0]} before, {result['load_average'][1]} "
        f"after; {result['seconds']} s)"
    )


if __name__ == "__main__":
    main()
