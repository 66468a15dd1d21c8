"""Prefix-cache-aware routing: p2c vs prefix vs an oracle, one and two gateways, on the bundled
chat model; plus what hashing a long prompt adds to the gateway.

    .venv/bin/python bench/prefix.py [--groups 8] [--users 4] [--turns 2] [--concurrency 4]
                                     [--prefix-words 700] [--max-tokens 8] [--slots 4] [--cache-ram 0]
    .venv/bin/python bench/prefix.py --overhead-only

Part 1, overhead (no model): ``request_key`` timed alone on an 8k-token chat prompt, then a
real gateway in front of two scripted upstreams, serving the same 8k-token prompt under a
p2c model and a prefix model: its added latency (x-modelfleet-overhead-ms), p50 and p99.

Part 2, workload (llm-d's shared-prefix shape, scaled down): G groups, each with a long
system prompt (~1,000 tokens) of its own; U users per group, each a conversation of T turns
(short questions; a follow-up carries the previous answer). Conversations run ``concurrency``
at a time, in a shuffled order that interleaves groups. A real cluster: controller (SQLite),
one worker, the bundled SmolLM2-135M with 2 replicas (llama.cpp backend: llama-server with
``--slots`` slots and one thread each), two gateways. Modes, side by side in one run:

- p2c: the deployment's routing "p2c", one gateway;
- prefix: routing "prefix", one gateway;
- prefix-2gw: routing "prefix", each request to one of the two gateways at random (a
  conversation's turns hop between gateways that share nothing);
- oracle: straight to the replica that last served the group (groups dealt round-robin).

Every mode gets system prompts of its own (the run name is in them), so no mode inherits
another's warm caches. Reported per mode: TTFT mean/p50/p90 (first streamed token),
generated tokens/s, requests per replica (max/mean), and prompt-cache reuse: the prompt
tokens llama-server did not evaluate again over all prompt tokens, from each answer's own
``usage.prompt_tokens_details.cached_tokens``. Table plus bench/results/prefix.json.

The scale: a replica's prompt cache is its slots (each keeps its last prompt's KV) plus
llama-server's RAM prompt cache (``--cache-ram`` MiB; 0 turns it off). At its default of
8 GiB a 135M model's RAM cache holds ~350k tokens, every prompt this workload has; an 8B
model's holds ~65 prompts of 1,000 tokens, fewer than a fleet's system prompts. So by
default each replica holds ``--slots`` prompts and the workload has twice as many groups:
a cache that holds half the working set, which is where routing decides what hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "prefix.json"
MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]
console = Console(width=180)

WORDS = (
    "order invoice warranty battery shipping return refund account password screen cable charger "
    "delivery address customer support product model serial number firmware update manual store "
    "payment card receipt discount coupon subscription plan upgrade device laptop phone tablet repair "
    "replacement parts service center appointment status tracking package courier weekend holiday "
    "opening hours contact email chat agent policy days months years price tax region country language"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Procs:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")},
            "MODELFLEET_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        }
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.home / f"{name}.log", "ab") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.all.append(p)
        return p

    def cli(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, "-m", "modelfleet.cli", *args])

    def stop(self) -> None:
        for p in reversed(self.all):
            p.send_signal(signal.SIGTERM)
        for p in reversed(self.all):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except (httpx.HTTPError, KeyError, StopIteration):
            pass
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


# -- part 1: overhead ----------------------------------------------------------------------------
def long_chat(tokens: int, model: str) -> dict[str, Any]:
    rng = random.Random(1)
    words = " ".join(rng.choice(WORDS) for _ in range(int(tokens * 0.75)))  # ~0.75 words a token
    return {
        "model": model,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": words[: len(words) // 2]},
            {"role": "user", "content": words[len(words) // 2 :]},
        ],
    }


def overhead(procs: Procs, n: int) -> dict[str, Any]:
    from modelfleet.gateway.prefix import request_key

    body = long_chat(8192, "m-prefix")
    size = len(json.dumps(body))
    t_key = []
    for _ in range(max(200, n)):
        t0 = time.perf_counter()
        request_key("chat", body)
        t_key.append(time.perf_counter() - t0)
    ups = {name: free_port() for name in ("a", "b")}
    for name, port in ups.items():
        procs.start(
            f"up-{name}", [sys.executable, "-m", "tests.fakes.scripted_upstream", "--port", str(port), "--name", name]
        )
    gport = free_port()

    def model(name: str, routing: str) -> dict[str, Any]:
        return {
            "name": name,
            "routing": routing,
            "instances": [
                {
                    "id": f"{name}/{u}",
                    "worker_id": "bench",
                    "endpoint": f"http://127.0.0.1:{p}",
                    "weight": 100,
                    "max_concurrency": 1000,
                    "enabled": True,
                    "state": "ready",
                }
                for u, p in ups.items()
            ],
        }

    routes = {
        "revision": 1,
        "store_time": time.time(),
        "controller_id": "bench",
        "heartbeat_ttl": 6.0,
        "models": [model("m-p2c", "p2c"), model("m-prefix", "prefix")],
        "api_keys": [],
    }
    snap = procs.home / "overhead-routes.json"
    snap.write_text(json.dumps({"fetched_at": time.time(), "routes": routes}))
    procs.start(
        "gw-overhead",
        [
            sys.executable,
            "-m",
            "modelfleet.gateway",
            "--port",
            str(gport),
            "--host",
            "127.0.0.1",
            "--snapshot-path",
            str(snap),
            "--max-body-bytes",
            str(4 << 20),
        ],
    )
    url = f"http://127.0.0.1:{gport}/v1/chat/completions"
    for p in ups.values():
        wait(lambda p=p: httpx.get(f"http://127.0.0.1:{p}/health").status_code == 200, 30, "upstream")
    wait(lambda: httpx.post(url, json=dict(body, model="m-p2c")).status_code == 200, 30, "overhead gateway")
    res: dict[str, list[float]] = {"m-p2c": [], "m-prefix": []}
    with httpx.Client(timeout=30) as c:
        for i in range(2 * n + 40):
            m = "m-p2c" if i % 2 == 0 else "m-prefix"
            r = c.post(url, json=dict(body, model=m))
            assert r.status_code == 200, r.text
            if i >= 40:  # warm-up: connections, first-use costs
                res[m].append(float(r.headers["x-modelfleet-overhead-ms"]))
    out = {
        "prompt_bytes": size,
        "prompt_tokens_approx": 8192,
        "request_key_us_p50": pct(t_key, 0.5) * 1e6,
        "request_key_us_p99": pct(t_key, 0.99) * 1e6,
    }
    for m, xs in res.items():
        out[m] = {"overhead_ms_p50": pct(xs, 0.5), "overhead_ms_p99": pct(xs, 0.99), "n": len(xs)}
    return out


# -- part 2: workload --------------------------------------------------------------------------
def system_prompt(run: str, group: int, words: int) -> str:
    rng = random.Random(f"{group}")
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Run {run}, desk {group}. You are the support agent of desk {group}. Reference notes: {body}."


def conversations(run: str, a: argparse.Namespace) -> list[tuple[int, list[str], str]]:
    """(group, questions, system prompt) per conversation, interleaved across groups."""
    rng = random.Random(11)
    convs = []
    for g in range(a.groups):
        sp = system_prompt(run, g, a.prefix_words)
        for u in range(a.users):
            qs = [
                f"Customer {u}, question {t + 1}: what about the {rng.choice(WORDS)} of my {rng.choice(WORDS)}?"
                for t in range(a.turns)
            ]
            convs.append((g, qs, sp))
    rng.shuffle(convs)
    return convs


@dataclass
class Answer:
    ttft: float  # to the first generated token
    tokens: int  # content events
    instance: str
    text: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the runner did not evaluate again


async def one_request(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int) -> Answer:
    """One streamed chat completion, with its usage (stream_options.include_usage)."""
    t0 = time.perf_counter()
    ttft = None
    n = 0
    text = []
    usage: dict[str, Any] = {}
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        inst = r.headers.get("x-modelfleet-instance", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta", {}).get("content")
                if delta is not None:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if delta:
                        n += 1
                        text.append(delta)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Answer(
        ttft if ttft is not None else time.perf_counter() - t0,
        n,
        inst,
        "".join(text),
        int(usage.get("prompt_tokens") or 0),
        int(cached),
    )


async def run_mode(
    mode: str, targets: list[str], oracle: dict[str, str] | None, a: argparse.Namespace
) -> dict[str, Any]:
    convs = conversations(mode, a)
    rng = random.Random(3)
    ttfts: list[float] = []
    per_replica: dict[str, int] = {}
    tokens = 0
    errors = 0
    prompt_tokens = cached_tokens = 0
    log: list[dict[str, Any]] = []  # one entry a request, in the order answered
    queue = list(convs)
    group_home: dict[int, str] = {}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors, prompt_tokens, cached_tokens
        while queue:
            group, questions, sp = queue.pop(0)
            messages = [{"role": "system", "content": sp}]
            for q in questions:
                messages.append({"role": "user", "content": q})
                if oracle is not None:
                    ends = list(oracle)
                    home = group_home.setdefault(group, ends[len(group_home) % len(ends)])
                    url = home
                else:
                    url = rng.choice(targets)
                try:
                    ans = await one_request(client, url, messages, a.max_tokens)
                except (RuntimeError, httpx.HTTPError) as exc:
                    errors += 1
                    console.print(f"[red]{mode}: {exc}[/red]")
                    break
                who = oracle[url] if oracle is not None else ans.instance
                ttfts.append(ans.ttft)
                log.append(
                    {
                        "group": group,
                        "instance": who,
                        "ttft_s": round(ans.ttft, 4),
                        "prompt_tokens": ans.prompt_tokens,
                        "cached_tokens": ans.cached_tokens,
                    }
                )
                tokens += ans.tokens
                prompt_tokens += ans.prompt_tokens
                cached_tokens += ans.cached_tokens
                per_replica[who] = per_replica.get(who, 0) + 1
                messages.append({"role": "assistant", "content": ans.text})

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker(client) for _ in range(a.concurrency)))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter() - t0
    loads = list(per_replica.values()) + [0] * (2 - len(per_replica))
    mean = statistics.mean(loads) if loads else 0
    return {
        "mode": mode,
        "requests": len(ttfts),
        "errors": errors,
        "wall_s": wall,
        "ttft_mean_s": statistics.mean(ttfts) if ttfts else None,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p90_s": pct(ttfts, 0.9),
        "tok_s": tokens / wall,
        "per_replica": per_replica,
        "max_over_mean_load": (max(loads) / mean) if mean else None,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_cached": cached_tokens,
        "prompt_tokens_evaluated": prompt_tokens - cached_tokens,
        "cache_reuse": cached_tokens / prompt_tokens if prompt_tokens else None,
        # What the load generator cost: this process's CPU over the mode's wall time.
        "client_cpu_share": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall,
        "requests_log": log,
    }


def prefix_outcomes(gateway: str) -> dict[str, float]:
    """modelfleet_gateway_prefix_routed_total of the bench model, by outcome."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{gateway}/metrics").text):
        for sample in family.samples:
            if sample.name == "modelfleet_gateway_prefix_routed_total" and sample.labels.get("model") == MODEL:
                outcome = sample.labels["outcome"]
                out[outcome] = out.get(outcome, 0) + sample.value
    return out


def set_routing(controller: str, gateways: list[str], routing: str) -> None:
    httpx.patch(f"{controller}/v1/cluster/deployments/{MODEL}", json={"routing": routing}).raise_for_status()

    def applied() -> bool:
        for g in gateways:
            st = httpx.get(f"{g}/v1/gateway/status").json()
            if next(m["routing"] for m in st["models"] if m["name"] == MODEL) != routing:
                return False
        return True

    wait(applied, 30, f"routing {routing} in the gateways")


def workload(procs: Procs, a: argparse.Namespace) -> dict[str, Any]:
    home = procs.home
    cport, wport = free_port(), free_port()
    controller = f"http://127.0.0.1:{cport}"
    procs.cli(
        "controller", "controller", "--store", f"sqlite:///{home}/state.db", "--host", "127.0.0.1", "--port", str(cport)
    )
    wait(lambda: httpx.get(f"{controller}/health/ready").status_code == 200, 60, "controller")
    procs.cli(
        "worker",
        "worker",
        "--controller",
        controller,
        "--name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(wport),
        "--runner-port-start",
        str(free_port()),
    )
    gateways = []
    for i in range(2):
        port = free_port()
        procs.cli(
            f"gateway{i}",
            "gateway",
            "--controller",
            controller,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--snapshot-path",
            str(home / f"routes{i}.json"),
            "--prefix-load-bound",
            str(a.prefix_load_bound),
            "--prefix-load-slack",
            str(a.prefix_load_slack),
        )
        gateways.append(f"http://127.0.0.1:{port}")
    params: dict[str, Any] = {"n_threads": 1, "parallel": a.slots, "cache_ram": a.cache_ram}
    if a.n_batch:
        # Chunked prompt evaluation: a miss's prompt goes through in pieces of n_batch tokens,
        # so other slots' hits and decode steps are not held behind all of it.
        params.update({"n_batch": a.n_batch, "n_ubatch": a.n_batch})
    httpx.post(
        f"{controller}/v1/cluster/deployments",
        json={
            "name": MODEL,
            "backend": "llama.cpp",
            "source": MODEL,
            "replicas": 2,
            "max_concurrency": a.slots,
            "routing": "p2c",
            "params": params,
        },
    ).raise_for_status()
    insts = wait(
        lambda: (
            (d := httpx.get(f"{controller}/v1/cluster/instances").json()["data"])
            and len(d) == 2
            and all(i["state"] == "ready" for i in d)
            and d
        ),
        300,
        "2 ready replicas",
    )
    oracle = {i["endpoint"]: i["id"] for i in insts}
    for g in gateways:
        wait(
            lambda g=g: (
                httpx.post(
                    f"{g}/v1/chat/completions",
                    timeout=60,
                    json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                ).status_code
                == 200
            ),
            60,
            "gateway",
        )
    rows = []
    plan = [
        ("p2c", "p2c", gateways[:1], None),
        ("prefix", "prefix", gateways[:1], None),
        ("prefix-2gw", "prefix", gateways, None),
        ("oracle", None, [], oracle),
    ]
    for mode, routing, targets, orc in plan:
        if mode not in a.modes.split(","):
            continue
        if routing is not None:
            set_routing(controller, gateways, routing)
        console.print(f"mode {mode} ...")
        before = [prefix_outcomes(g) for g in gateways]
        row = asyncio.run(run_mode(mode, targets, orc, a))
        after = [prefix_outcomes(g) for g in gateways]
        # How the gateways decided (cached / home / spilled), summed over both.
        row["prefix_outcomes"] = {
            k: sum(b2.get(k, 0) - b1.get(k, 0) for b1, b2 in zip(before, after, strict=True))
            for k in ("cached", "home", "spilled")
        }
        rows.append(row)
    return {"rows": rows, "replicas": list(oracle.values()), "params": params}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prefix-words", type=int, default=700, help="~1,000 tokens of system prompt")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4, help="llama-server slots per replica (its max_concurrency)")
    ap.add_argument(
        "--cache-ram",
        type=int,
        default=0,
        help="llama-server's RAM prompt cache per replica, MiB (0: off, so a replica holds --slots prompts; "
        "~23 MB a 1,000-token prompt)",
    )
    ap.add_argument("--n-batch", type=int, default=0, help="llama-server --batch-size/--ubatch-size (0: its own)")
    ap.add_argument("--prefix-load-bound", type=float, default=1.25)
    ap.add_argument("--prefix-load-slack", type=int, default=0)
    ap.add_argument("--modes", default="p2c,prefix,prefix-2gw,oracle")
    ap.add_argument("--overhead-n", type=int, default=200)
    ap.add_argument("--overhead-only", action="store_true")
    a = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mf-bench-prefix-"))
    procs = Procs(home)
    result: dict[str, Any] = {
        "benchmark": "prefix",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(a),
    }
    t_start = time.perf_counter()
    try:
        result["overhead"] = overhead(procs, a.overhead_n)
        if not a.overhead_only:
            result["workload"] = workload(procs, a)
    finally:
        procs.stop()
    result["bench_wall_s"] = time.perf_counter() - t_start

    o = result["overhead"]
    t = Table(title=f"gateway overhead, one ~8k-token chat prompt ({o['prompt_bytes']} bytes), sequential")
    for col in ("routing", "added latency p50 ms", "p99 ms", "n"):
        t.add_column(col, justify="right")
    for m in ("m-p2c", "m-prefix"):
        t.add_row(m[2:], f"{o[m]['overhead_ms_p50']:.3f}", f"{o[m]['overhead_ms_p99']:.3f}", str(o[m]["n"]))
    console.print(t)
    console.print(f"request_key alone: p50 {o['request_key_us_p50']:.0f} µs, p99 {o['request_key_us_p99']:.0f} µs")
    if "workload" in result:
        rows = result["workload"]["rows"]
        base = next((r for r in rows if r["mode"] == "p2c"), None)
        single = next((r for r in rows if r["mode"] == "prefix"), None)
        t = Table(
            title=f"{a.groups} groups x {a.users} users x {a.turns} turns, ~{a.prefix_words} words of shared "
            f"system prompt, concurrency {a.concurrency}, max_tokens {a.max_tokens}, 2 replicas x "
            f"{a.slots} slots, RAM prompt cache {a.cache_ram} MiB"
        )
        for col in (
            "mode",
            "requests",
            "TTFT mean s",
            "p50 s",
            "p90 s",
            "mean vs p2c",
            "tok/s",
            "tok/s vs p2c",
            "cache reuse",
            "per replica",
            "max/mean load",
            "errors",
        ):
            t.add_column(col, justify="right")
        for r in rows:
            if base and base["ttft_mean_s"] and r["ttft_mean_s"]:
                r["ttft_mean_vs_p2c"] = r["ttft_mean_s"] / base["ttft_mean_s"]
                r["tok_s_vs_p2c"] = r["tok_s"] / base["tok_s"]
            t.add_row(
                r["mode"],
                str(r["requests"]),
                f"{r['ttft_mean_s']:.3f}",
                f"{r['ttft_p50_s']:.3f}",
                f"{r['ttft_p90_s']:.3f}",
                f"{r.get('ttft_mean_vs_p2c', float('nan')):.0%}",
                f"{r['tok_s']:.1f}",
                f"{r.get('tok_s_vs_p2c', float('nan')):.0%}",
                "-" if r["cache_reuse"] is None else f"{r['cache_reuse']:.0%}",
                " ".join(str(v) for v in sorted(r["per_replica"].values())),
                f"{r['max_over_mean_load']:.2f}",
                str(r["errors"]),
            )
        console.print(t)
        console.print(
            "load generator: " + ", ".join(f"{r['mode']} {r['client_cpu_share']:.0%} of a core" for r in rows)
        )
        two = next((r for r in rows if r["mode"] == "prefix-2gw"), None)
        if base and single and two and base["cache_reuse"] is not None and single["cache_reuse"] is not None:
            # Prompt tokens the replicas did not have to evaluate: the routing's own effect, free
            # of the queueing noise that TTFT carries on a shared machine.
            won = single["cache_reuse"] - base["cache_reuse"]
            result["two_gateway_share_of_reuse_gain"] = (
                (two["cache_reuse"] - base["cache_reuse"]) / won if won else None
            )
            if won:
                console.print(
                    f"two gateways keep {result['two_gateway_share_of_reuse_gain']:.0%} of the single-gateway "
                    "cache-reuse gain"
                )
        if base and single and two:
            gain1 = base["ttft_mean_s"] - single["ttft_mean_s"]
            gain2 = base["ttft_mean_s"] - two["ttft_mean_s"]
            result["two_gateway_share_of_gain"] = gain2 / gain1 if gain1 > 0 else None
            console.print(
                f"two gateways keep {result['two_gateway_share_of_gain']:.0%} of the single-gateway TTFT gain"
                if gain1 > 0
                else "no single-gateway gain to compare"
            )
    console.print(
        f"benchmark wall time {result['bench_wall_s']:.0f} s (load generator: one asyncio client, "
        f"{a.concurrency} conversations at a time)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
