"""Batched llama.cpp: one replica of the bundled chat model (SmolLM2-135M) under 1, 4 and 8
concurrent streams, side by side in one run:

- ``llama-server``: the llama.cpp backend (llama.cpp's own server, 8 slots, continuous batching);
- ``gateway``: the same llama-server instance through modelfleet's gateway (route snapshot,
  no controller: the gateway's own cost only);
- ``llama-cpp-python``: the llama-cpp-python backend (its server, one request at a time).

    .venv/bin/python bench/batching.py [--max-tokens 64] [--rounds 2] [--threads 2] [--trials 1]

Load: a closed loop per concurrency level: ``c`` clients, each sending ``rounds`` streamed
chats one after another (``max_tokens`` output tokens, temperature 0, a different prompt per
request so no two share a cached prompt). Aggregate output tokens/s = content chunks (one
token each on both servers) / wall time of the level; TTFT = time to the first content
chunk. The generator is one asyncio loop in this process (httpx); its CPU time is measured
and reported (it competes with the servers for the 2 cores). Levels run in turn, targets
alternate order per trial. Prints a table and writes bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
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

from modelfleet.models import InstanceSpec, InstanceState
from modelfleet.worker.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("llama-server", "gateway", "llama-cpp-python")
RESULTS = ROOT / "bench" / "results" / "batching.json"
MODEL = "smollm2-135m-instruct"
SUBJECTS = [
    "a lighthouse keeper",
    "a bicycle",
    "the moon",
    "a busy market",
    "a mountain village",
    "a violin",
    "a train journey",
    "a garden in spring",
    "an old library",
    "a river",
    "a chess game",
    "a storm",
]
console = Console()


errors: list[str] = []  # non-200 answers, kept for the report


def prompt(i: int) -> str:
    return f"Write a short story about {SUBJECTS[i % len(SUBJECTS)]}, number {i}."


async def one_stream(http: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[int, float | None]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            errors.append(f"{r.status_code} {(await r.aread())[:300]!r}")
            return 0, None
        async for line in r.aiter_lines():
            # Cheap: count chunks that carry content without decoding the JSON.
            if (
                line.startswith("data: ")
                and '"content":"' in line.replace('": "', '":"')
                and '"content":""' not in line.replace('": "', '":"')
            ):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - started
    return tokens, ttft


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children, so far."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def level(
    url: str, c: int, rounds: int, max_tokens: int, seq: list[int], server_pid: int | None = None
) -> dict[str, Any]:
    async with httpx.AsyncClient(
        timeout=600,
        trust_env=False,
        limits=httpx.Limits(max_connections=c + 2, max_keepalive_connections=0),  # see docs/runners.md
    ) as http:
        await one_stream(http, url, 10_000 + seq[0], 4)  # warm the connection and the server
        seq[0] += 1
        results: list[tuple[int, float | None]] = []

        async def client() -> None:
            for _ in range(rounds):
                seq[0] += 1
                results.append(await one_stream(http, url, seq[0], max_tokens))

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        server0 = process_cpu_s(server_pid) if server_pid else 0.0
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        server1 = process_cpu_s(server_pid) if server_pid else 0.0
    tokens = sum(t for t, _ in results)
    ttfts = sorted(t for _, t in results if t is not None)
    return {
        "concurrency": c,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2),
        "ttft_p50_s": round(pct(ttfts, 50), 4),
        "ttft_p90_s": round(pct(ttfts, 90), 4),
        "generator_cpu_s": round((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 3),
        # The gateway's own CPU over the level (gateway targets only): what it takes from the
        # cores the runner decodes on, free of the wall-clock noise of a shared machine.
        "gateway_cpu_s": round(server1 - server0, 3) if server_pid else None,
    }


def pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(work: Path, endpoint: str, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    """modelfleet's gateway on a route snapshot naming the llama-server instance (no controller)."""
    port = free_port()
    snap = work / "routes.json"
    routes = {
        "revision": 1,
        "store_time": time.time(),
        "controller_id": "bench",
        "heartbeat_ttl": 6.0,
        "models": [
            {
                "name": MODEL,
                "instances": [
                    {
                        "id": "bench/llama-server",
                        "worker_id": "bench",
                        "endpoint": endpoint,
                        "weight": 100,
                        "max_concurrency": slots,
                        "enabled": True,
                        "state": "ready",
                    }
                ],
            }
        ],
        "api_keys": [],
    }
    snap.write_text(json.dumps({"fetched_at": time.time(), "routes": routes}))
    with (work / "gw.log").open("wb") as log:
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet.gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--snapshot-path",
                str(snap),
                "--log-level",
                "warning",
                "--controller",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    wait_http(f"http://127.0.0.1:{port}/health/live", 60)
    return gw, f"http://127.0.0.1:{port}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="which of them to run (llama-server,gateway for a longer gateway-vs-direct comparison)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    wanted = [t for t in TARGETS if t in a.targets.split(",")]
    if "gateway" in wanted and "llama-server" not in wanted:
        raise SystemExit("--targets: the gateway runs in front of llama-server; name both")
    slots = max(levels)
    work = Path(tempfile.mkdtemp(prefix="mf-bench-batching-"))
    sup = Supervisor(log_dir=work, port_start=random.randrange(20000, 32000, 10), startup_timeout=120)
    params = {"n_threads": a.threads, "n_ctx": 1024}
    specs = [
        InstanceSpec(
            id="bench/llama-server",
            model=MODEL,
            backend="llama.cpp",
            source=MODEL,
            max_concurrency=slots,
            params=params,
        ),
        InstanceSpec(id="bench/llama-cpp-python", model=MODEL, backend="llama-cpp-python", source=MODEL, params=params),
    ]
    specs = [sp for sp in specs if sp.id.removeprefix("bench/") in wanted]
    load_before = os.getloadavg()
    gw = None
    rows: list[dict[str, Any]] = []
    try:
        await sup.apply(specs)
        deadline = time.monotonic() + 180
        while not all(s.state == InstanceState.READY for s in sup.statuses()):
            if time.monotonic() > deadline or any(s.state == InstanceState.FAILED for s in sup.statuses()):
                raise SystemExit(f"runners not ready: {[(s.id, s.state, s.last_error) for s in sup.statuses()]}")
            await asyncio.sleep(0.3)
        ep = {s.id: s.endpoint for s in sup.statuses()}
        gw_url = ""
        if "gateway" in wanted:
            gw, gw_url = await asyncio.to_thread(start_gateway, work, ep["bench/llama-server"], slots)
        # In the order of TARGETS: the gateway runs next to direct in every trial.
        targets = {name: gw_url if name == "gateway" else ep[f"bench/{name}"] for name in wanted}
        seq = [0]
        for trial in range(a.trials):
            order = list(targets) if trial % 2 == 0 else list(reversed(targets))
            for c in levels:
                for name in order:
                    pid = gw.pid if name == "gateway" and gw is not None else None
                    r = await level(targets[name], c, a.rounds, a.max_tokens, seq, pid)
                    r.update(target=name, trial=trial)
                    rows.append(r)
                    console.print(f"trial {trial} c={c} {name}: {r['tok_s']} tok/s, TTFT p50 {r['ttft_p50_s']} s")
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(10)
        await sup.stop_all()
    report(rows, a, levels, load_before)


def report(
    rows: list[dict[str, Any]], a: argparse.Namespace, levels: list[int], load_before: tuple[float, ...]
) -> None:
    def med(target: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["target"] == target and r["concurrency"] == c)

    table = Table(title=f"bundled chat model, one replica, {a.max_tokens} output tokens per request")
    for col in ("target", "c", "tok/s", "TTFT p50 s", "TTFT p90 s", "requests", "generator CPU s"):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {}
    names = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    for name in names:
        for c in levels:
            cell = {k: med(name, c, k) for k in ("tok_s", "ttft_p50_s", "ttft_p90_s", "generator_cpu_s")}
            summary[f"{name}@{c}"] = cell
            reqs = sum(r["requests"] for r in rows if r["target"] == name and r["concurrency"] == c)
            table.add_row(
                name,
                str(c),
                f"{cell['tok_s']:.1f}",
                f"{cell['ttft_p50_s']:.3f}",
                f"{cell['ttft_p90_s']:.3f}",
                str(reqs),
                f"{cell['generator_cpu_s']:.2f}",
            )
    console.print(table)
    top, low = max(levels), min(levels)
    ratios: dict[str, float] = {}
    if {"llama-server", "llama-cpp-python"} <= set(names):
        ratios[f"llama-server c={top} / llama-cpp-python c={top} tok/s (goal >= 2)"] = (
            summary[f"llama-server@{top}"]["tok_s"] / summary[f"llama-cpp-python@{top}"]["tok_s"]
        )
    if "llama-server" in names:
        ratios[f"llama-server c={top} / c={low} tok/s (goal >= 1.2)"] = (
            summary[f"llama-server@{top}"]["tok_s"] / summary[f"llama-server@{low}"]["tok_s"]
        )
        ratios[f"llama-server TTFT p50 c={top} / c={low} (goal <= 10)"] = (
            summary[f"llama-server@{top}"]["ttft_p50_s"] / summary[f"llama-server@{low}"]["ttft_p50_s"]
        )
    if "llama-cpp-python" in names:
        ratios[f"llama-cpp-python TTFT p50 c={top} / c={low}"] = (
            summary[f"llama-cpp-python@{top}"]["ttft_p50_s"] / summary[f"llama-cpp-python@{low}"]["ttft_p50_s"]
        )
    if "gateway" in names:

        def pooled(target: str, c: int, key: str) -> float:
            return sum(r[key] for r in rows if r["target"] == target and r["concurrency"] == c)

        for c in levels:
            # Pooled over the trials (all tokens / all wall time of each target at this level),
            # which weighs every request alike; the gateway and direct levels of a trial run
            # back to back, so slow spells of a shared machine fall on both.
            gw_tokens, gw_wall, gw_cpu = (pooled("gateway", c, k) for k in ("tokens", "wall_s", "gateway_cpu_s"))
            direct_tok_s = pooled("llama-server", c, "tokens") / pooled("llama-server", c, "wall_s")
            ratios[f"gateway / direct tok/s at c={c} (goal >= 0.97)"] = gw_tokens / gw_wall / direct_tok_s
            cell = summary[f"gateway@{c}"]
            cell["gateway_cpu_us_per_token"] = round(gw_cpu / gw_tokens * 1e6, 1)
            cell["gateway_cpu_share_of_a_core"] = round(gw_cpu / gw_wall, 4)
            console.print(
                f"gateway CPU at c={c}: {cell['gateway_cpu_us_per_token']:.0f} µs per streamed token, "
                f"{cell['gateway_cpu_share_of_a_core']:.1%} of a core"
            )
    for k, v in ratios.items():
        console.print(f"{k}: [bold]{v:.2f}[/bold]")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "benchmark": "batching",
                "args": {k: str(v) for k, v in vars(a).items()},
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "load_before": load_before,
                    "load_after": os.getloadavg(),
                },
                "summary": summary,
                "errors": errors,
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    asyncio.run(main())
