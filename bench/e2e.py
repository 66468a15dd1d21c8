"""The bundled chat model through the gateway versus the same runners called directly.

    .venv/bin/python bench/e2e.py [--concurrency 1,8] [--requests 24] [--rounds 2] [--max-tokens 32]

Starts a real cluster (controller on SQLite, one worker, gateway), deploys
smollm2-135m-instruct with 2 replicas (llama.cpp, one thread each: this machine has 2
cores), then for each concurrency alternates rounds of the same request set sent
(a) straight to the two runner endpoints, round-robin, and (b) through the gateway, so
that both paths see the same machine noise. Reports requests/s and generated tokens/s per
path and the gateway/direct ratio (goal: at least 98 %). Table plus bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"
MODEL = "smollm2-135m-instruct"
console = Console(width=160)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "modelfleet.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


async def run_load(urls: list[str], concurrency: int, n: int, max_tokens: int) -> dict[str, float]:
    """n chat requests, `concurrency` at a time, round-robin over urls; returns req/s and tokens/s."""
    rr = itertools.cycle(urls)
    sem = asyncio.Semaphore(concurrency)
    tokens: list[int] = []
    latencies: list[float] = []
    errors = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        async with sem:
            url = next(rr)
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": MODEL, "max_tokens": max_tokens, "temperature": 0, "seed": i,
                "messages": [{"role": "user", "content": f"Write a short sentence about the number {i}."}]})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1
                return
            tokens.append(r.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"req_s": len(tokens) / wall, "tok_s": sum(tokens) / wall, "errors": errors,
            "p50_s": statistics.median(latencies), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mf-bench-e2e-"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")},
           "MODELFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cport, wport, gport = free_port(), free_port(), free_port()
    controller, gateway = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{gport}"
    procs = [start(["controller", "--store", f"sqlite:///{home}/state.db", "--host", "127.0.0.1", "--port",
                    str(cport)], home / "controller.log", env)]
    try:
        wait(lambda: httpx.get(f"{controller}/health/ready").status_code == 200, 60, "controller")
        procs.append(start(["worker", "--controller", controller, "--name", "bench", "--host", "127.0.0.1",
                            "--port", str(wport), "--runner-port-start", str(free_port())], home / "worker.log", env))
        procs.append(start(["gateway", "--controller", controller, "--host", "127.0.0.1", "--port", str(gport),
                            "--snapshot-path", str(home / "routes.json")], home / "gateway.log", env))
        httpx.post(f"{controller}/v1/cluster/deployments", json={
            "name": MODEL, "backend": "llama.cpp", "source": MODEL, "replicas": 2, "max_concurrency": 8,
            "params": {"n_threads": 1}}).raise_for_status()
        insts = wait(lambda: (d := httpx.get(f"{controller}/v1/cluster/instances").json()["data"])
                     and len(d) == 2 and all(i["state"] == "ready" for i in d) and d, 300, "2 ready replicas")
        direct = [i["endpoint"] for i in insts]
        wait(lambda: httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200,
            60, "gateway")
        asyncio.run(run_load(direct, 2, 4, a.max_tokens))  # warm both runners

        rows: list[dict[str, Any]] = []
        for conc in [int(c) for c in a.concurrency.split(",")]:
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
            for _ in range(a.rounds):
                for path, urls in (("direct", direct), ("gateway", [gateway])):
                    runs[path].append(asyncio.run(run_load(urls, conc, a.requests, a.max_tokens)))
            med = {p: {k: statistics.median(r[k] for r in rs) for k in ("req_s", "tok_s", "p50_s")}
                   for p, rs in runs.items()}
            rows.append({
                "concurrency": conc, "direct": med["direct"], "gateway": med["gateway"],
                "errors": sum(r["errors"] for rs in runs.values() for r in rs),
                "ratio_req_s": med["gateway"]["req_s"] / med["direct"]["req_s"],
                "ratio_tok_s": med["gateway"]["tok_s"] / med["direct"]["tok_s"],
            })
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    table = Table(title=f"bundled chat model, 2 replicas, {a.requests} requests x {a.rounds} rounds, "
                        f"max_tokens {a.max_tokens} (median of rounds)")
    for col in ("concurrency", "direct req/s", "gateway req/s", "direct tok/s", "gateway tok/s",
                "gateway/direct req/s", "gateway/direct tok/s", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["concurrency"]), f"{r['direct']['req_s']:.2f}", f"{r['gateway']['req_s']:.2f}",
                      f"{r['direct']['tok_s']:.1f}", f"{r['gateway']['tok_s']:.1f}", f"{r['ratio_req_s']:.1%}",
                      f"{r['ratio_tok_s']:.1%}", str(r["errors"]))
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "e2e", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(a), "goal": "gateway >= 98% of direct", "rows": rows}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
