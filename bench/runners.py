"""What a runner costs: the bundled models through their runner's HTTP against the same
model called in-process, side by side in one run.

    .venv/bin/python bench/runners.py [--trials 10] [--budget 25] [--max-tokens 32] [--threads 1]

- chat (SmolLM2-135M, llama-cpp-python backend): completion tokens/s for 1 stream and for 4
  concurrent streams, through the llama.cpp runner (streamed SSE over HTTP) against
  ``llama_cpp.Llama.create_chat_completion(stream=True)`` in this process, the Llama built
  by the server's own loader from the same settings (n_ctx, n_threads, …). The server
  serves one request at a time, so 4 concurrent streams queue in it; in-process the 4
  run one after the other, which is the same work.
- embeddings (all-MiniLM-L6-v2, sentence-transformers backend): embeddings/s through our
  runner against ``SentenceTransformer.encode`` in this process (same torch threads),
  with 1 text per request (per-request overhead) and 32 texts per request from 4 clients.

Short paired trials alternate which side goes first; the cost is 1 - the median of the
per-pair ratios (runner rate / in-process rate), with its interquartile range, because
these machines are shared and noisy (goal: under 5 %). Prints a table and writes
bench/results/runners.json, with every trial and the load average around the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from modelfleet.bundled import BUNDLED
from modelfleet.models import InstanceSpec, InstanceState
from modelfleet.worker.supervisor import Supervisor

RESULTS = Path(__file__).resolve().parent / "results" / "runners.json"
CHAT_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List some facts about the moon.",
    "Describe a busy market in the morning.",
]
TOPICS = ["weather", "cooking", "trains", "music", "gardens", "rivers", "software", "chess"]
TEXTS = [f"Sentence number {i} is about {TOPICS[i % len(TOPICS)]} and the {i % 7}th detail of it."
         for i in range(512)]


# ------------------------------------------------------------------------ chat

async def http_chat_stream(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> int:
    """One streamed chat through the runner; returns the number of content chunks (tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    tokens = 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                tokens += 1
    return tokens


def inproc_chat_stream(llm: Any, prompt: str, max_tokens: int) -> int:
    tokens = 0
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            tokens += 1
    return tokens


# ------------------------------------------------------------------ embeddings

async def http_embed(http: httpx.AsyncClient, url: str, model: str, texts: list[str]) -> int:
    r = await http.post(f"{url}/v1/embeddings", json={"model": model, "input": texts})
    r.raise_for_status()
    return len(r.json()["data"])


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def gather_limited(jobs: list[Callable[[], Awaitable[int]]], concurrency: int) -> int:
    """Run the jobs with at most ``concurrency`` in flight; sum their counts."""
    queue = list(jobs)
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            job = queue.pop(0)
            n = await job()  # not `total += await job()`: that reads total before the await
            total += n

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


# ----------------------------------------------------------------------- main

def timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


async def atimed(fn: Callable[[], Awaitable[int]]) -> float:
    t0 = time.perf_counter()
    n = await fn()
    return n / (time.perf_counter() - t0)


async def paired(trials: int, budget_s: float, inproc: Callable[[], int],
                 runner: Callable[[], Awaitable[int]]) -> dict[str, Any]:
    """Short paired trials, alternating which side goes first, up to ``trials`` pairs or
    ``budget_s`` seconds (at least 3 pairs). A burst of load from a neighbour hits both
    halves of a pair alike, so the median of per-pair ratios is far steadier than a ratio
    of two long averages."""
    inproc()  # warm-up: first calls pay one-off costs on both sides
    await runner()
    a: list[float] = []
    b: list[float] = []
    deadline = time.monotonic() + budget_s
    for i in range(trials):
        if i >= 3 and time.monotonic() > deadline:
            break
        if i % 2 == 0:
            a.append(timed(inproc))
            b.append(await atimed(runner))
        else:
            b.append(await atimed(runner))
            a.append(timed(inproc))
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    return {"in_process": round(statistics.median(a), 2), "runner": round(statistics.median(b), 2),
            "cost_pct": round((1 - statistics.median(ratios)) * 100, 2),
            "cost_pct_iqr": [round((1 - q) * 100, 2) for q in reversed(statistics.quantiles(ratios, n=4)[::2])],
            "in_process_trials": [round(x, 2) for x in a], "runner_trials": [round(y, 2) for y in b]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="paired trials per scenario, at most")
    ap.add_argument("--budget", type=float, default=25.0, help="seconds per scenario (at least 3 pairs run)")
    ap.add_argument("--max-tokens", type=int, default=32)
    # One thread by default: on a shared machine, a 2-thread OpenMP region stalls whenever a
    # neighbour preempts either thread, and the figures turn to noise.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--only", default="", help="run only scenarios whose name contains this (chat, embeddings)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    load_before = [round(x, 2) for x in os.getloadavg()]  # how busy the shared machine was
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    chat_model, emb_model = "smollm2-135m-instruct", "all-minilm-l6-v2"
    # No health probes during the run: the in-process side blocks this loop on purpose.
    sup = Supervisor(log_dir=Path(tempfile.mkdtemp(prefix="bench-runners-")), port_start=31000,
                     startup_timeout=180, health_interval=3600)
    llama_params = {"n_ctx": args.n_ctx, "n_threads": args.threads, "n_threads_batch": args.threads}
    specs = [InstanceSpec(id="bench/chat", model=chat_model, backend="llama-cpp-python", source=chat_model,
                          params=llama_params),
             InstanceSpec(id="bench/emb", model=emb_model, backend="sentence-transformers", source=emb_model,
                          params={"n_threads": args.threads})]
    results: list[dict[str, Any]] = []
    try:
        await sup.apply(specs)
        console.print("starting runners and loading the in-process models…")

        import torch
        from llama_cpp.server.model import LlamaProxy
        from llama_cpp.server.settings import ModelSettings
        from sentence_transformers import SentenceTransformer

        # The server's own loader and settings: the only difference left is the serving layer.
        settings = ModelSettings(model=str(BUNDLED[chat_model].path()), model_alias=chat_model, verbose=False,
                                 **llama_params)
        llm = LlamaProxy.load_llama_from_model_settings(settings)
        torch.set_num_threads(args.threads)
        st_model = SentenceTransformer(str(BUNDLED[emb_model].path()), device="cpu", local_files_only=True)

        deadline = time.monotonic() + 180
        while not all(s.state == InstanceState.READY for s in sup.statuses()):
            bad = [s for s in sup.statuses() if s.state == InstanceState.FAILED]
            if bad or time.monotonic() > deadline:
                raise SystemExit(f"runners not ready: {[(s.id, s.state, s.last_error) for s in sup.statuses()]}")
            await asyncio.sleep(0.2)
        ep = {s.id: s.endpoint for s in sup.statuses()}
        chat_url, emb_url = ep["bench/chat"], ep["bench/emb"]

        async with httpx.AsyncClient(trust_env=False, timeout=300) as http:
            mt = args.max_tokens

            # chat, 1 stream
            def chat1_in() -> int:
                return inproc_chat_stream(llm, CHAT_PROMPTS[0], mt)

            async def chat1_http() -> int:
                return await http_chat_stream(http, chat_url, chat_model, CHAT_PROMPTS[0], mt)

            # chat, 4 concurrent streams (queued in the runner; one after the other in-process)
            def chat4_in() -> int:
                return sum(inproc_chat_stream(llm, p, mt) for p in CHAT_PROMPTS)

            async def chat4_http() -> int:
                counts = await asyncio.gather(*(http_chat_stream(http, chat_url, chat_model, p, mt)
                                                for p in CHAT_PROMPTS))
                return sum(counts)

            one_texts = TEXTS[:16]

            def emb1_in() -> int:
                for t in one_texts:
                    st_model.encode([t], show_progress_bar=False)
                return len(one_texts)

            async def emb1_http() -> int:
                return sum([await http_embed(http, emb_url, emb_model, [t]) for t in one_texts])

            batches = chunks(TEXTS[:128], 32)

            def emb32_in() -> int:
                for b in batches:
                    st_model.encode(b, batch_size=32, show_progress_bar=False)
                return sum(len(b) for b in batches)

            async def emb32_http() -> int:
                return await gather_limited(
                    [lambda b=b: http_embed(http, emb_url, emb_model, b) for b in batches], 4)

            scenarios = [
                ("chat, 1 stream", "tokens/s", chat1_in, chat1_http),
                ("chat, 4 concurrent streams", "tokens/s", chat4_in, chat4_http),
                ("embeddings, 1 text/request", "embeddings/s", emb1_in, emb1_http),
                ("embeddings, 32 texts/request, 4 clients", "embeddings/s", emb32_in, emb32_http),
            ]
            for name, unit, fin, fhttp in scenarios:
                if args.only not in name:
                    continue
                console.print(f"  {name}…")
                results.append({"scenario": name, "unit": unit, **await paired(args.trials, args.budget, fin, fhttp)})
    finally:
        await sup.stop_all()

    table = Table(title=f"runner cost: median of {args.trials} paired trials, {args.threads} threads")
    for col in ("scenario", "unit", "in-process", "through runner", "cost", "cost IQR"):
        table.add_column(col, justify="left" if col in ("scenario", "unit") else "right")
    for r in results:
        cost = f"{r['cost_pct']:+.1f} %"
        lo, hi = r["cost_pct_iqr"]
        table.add_row(r["scenario"], r["unit"], f"{r['in_process']:.1f}", f"{r['runner']:.1f}",
                      f"[green]{cost}[/]" if r["cost_pct"] < 5 else f"[red]{cost}[/]", f"{lo:+.1f} … {hi:+.1f} %")
    console.print(table)
    out = {
        "benchmark": "runners",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "params": {"trials": args.trials, "budget_s": args.budget, "max_tokens": args.max_tokens,
                   "threads": args.threads, "n_ctx": args.n_ctx},
        "goal": "runner cost under 5 %",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
