"""Gateway overhead, side by side in one run: the upstream called directly, through
modelfleet (1 and 2 processes), through LiteLLM's proxy, and through nginx as a proxy (the
floor). Everything listens on 127.0.0.1 and every run is bounded in time.

Upstreams: nginx serving fixed bodies (a small chat.completion JSON; a stream of 100
chat.completion.chunk events plus [DONE], as text/event-stream), fast enough not to be the
bottleneck. Load: wrk, at concurrency 1, 32 and 256. A second measurement sends streams
paced by the scripted upstream (100 chunks, one every 2 ms) to see delay added per chunk.

modelfleet's gateway routes from a route snapshot here (no controller process competing
for the CPU; the controller is never on the request path anyway). LiteLLM runs from its
own virtualenv (never .venv): `python bench/gateway.py --setup-litellm` creates
bench/.litellm-venv; or point LITELLM_VENV at one.

    python bench/gateway.py [--duration 8] [--concurrency 1,32,256] [--skip-litellm]

Prints a Rich table; writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gateway.json"
LITELLM_VENV = Path(os.environ.get("LITELLM_VENV") or ROOT / "bench" / ".litellm-venv")
console = Console(width=None if sys.stdout.isatty() else 150)

CHAT_BODY = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                          "finish_reason": "stop", "logprobs": None}],
             "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}}
REQUEST = {"json": {"model": "json", "messages": [{"role": "user", "content": "hi"}]},
           "sse": {"model": "sse", "stream": True, "messages": [{"role": "user", "content": "hi"}]}}


def stream_body(chunks: int = 100) -> str:
    out = []
    for i in range(chunks):
        c = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench",
             "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
        out.append("data: " + json.dumps(c, separators=(",", ":")) + "\n\n")
    return "".join(out) + "data: [DONE]\n\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Subprocesses we started; stopped by PID (and their own session) at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir, self.all = logdir, []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # the child keeps its own copy of the fd
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             start_new_session=True, cwd=ROOT)
        log.close()
        self.all.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.all):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.all):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_http(url: str, timeout: float, method: str = "GET", body: dict[str, Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.request(method, url, json=body, timeout=2)
            if r.status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def check_targets(direct: dict[str, str], targets: dict[str, str]) -> None:
    """Every target must answer each payload with 200 and the whole body before we time it."""
    for payload in ("json", "sse"):
        for base in (direct[payload], *targets.values()):
            r = httpx.post(f"{base}/v1/chat/completions", json=REQUEST[payload], headers={"x-bench": payload},
                           timeout=30)
            ok = r.status_code == 200 and (b"Hello!" in r.content if payload == "json" else
                                           r.content.count(b"data: ") >= 101 and b"[DONE]" in r.content)
            if not ok:
                raise SystemExit(f"{base} answered {r.status_code} for {payload}: {r.content[:200]!r}")


# -- wrk -----------------------------------------------------------------------------------------
@dataclass
class Run:
    target: str
    payload: str
    concurrency: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    pct_of_nginx: float | None = None
    x_litellm: float | None = None


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v if unit == "ms" else v * 1000 if unit == "s" else v * 60000


def parse_wrk(out: str, run: Run) -> Run:
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        run.rps = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        run.p50_ms = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        run.p99_ms = _ms(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        run.requests = int(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        run.non_2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        run.socket_errors = sum(int(x) for x in m.groups())
    if run.requests == 0:  # nothing completed within the run: no latency to speak of
        run.p50_ms = run.p99_ms = float("nan")
    return run


def wrk(url: str, body: dict[str, Any], concurrency: int, duration: float, lua: Path) -> str:
    env = {**os.environ, "BODY": json.dumps(body)}
    # One wrk thread: on a 2-core machine a second one takes CPU from the proxy under test
    # (nginx proxied fewer req/s with -t2 than with -t1) and skews the tail.
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
           "--latency", "-s", str(lua), url]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 30)
    if "Requests/sec" not in p.stdout:
        console.print(f"[red]wrk failed[/red] ({' '.join(cmd)}): {p.stderr.strip()[:300]}")
    return p.stdout


# -- paced streams: delay added per chunk ------------------------------------------------------------
async def paced(url: str, n: int) -> dict[str, float]:
    """Sequential streams; median time to the first chunk and to [DONE]."""
    import aiohttp

    firsts, totals, chunks = [], [], []
    body = {"model": "paced", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            t0 = time.perf_counter()
            first = None
            count = 0
            async with s.post(url, json=body, headers={"x-bench": "paced"}) as r:
                buf = b""
                async for data in r.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - t0
                    buf += data
                    count = buf.count(b"data: ")
                    if b"[DONE]" in buf:
                        break
            totals.append(time.perf_counter() - t0)
            firsts.append(first or 0.0)
            chunks.append(count)
    return {"ttft_ms": statistics.median(firsts) * 1000, "total_ms": statistics.median(totals) * 1000,
            "events": statistics.median(chunks)}


# -- setup ----------------------------------------------------------------------------------------
def nginx_conf(work: Path, ports: dict[str, int]) -> Path:
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {work}/tmp-body;
  proxy_temp_path {work}/tmp-proxy;
  upstream up_json {{ server 127.0.0.1:{ports['up_json']}; keepalive 512; }}
  upstream up_sse {{ server 127.0.0.1:{ports['up_sse']}; keepalive 512; }}
  upstream up_paced {{ server 127.0.0.1:{ports['paced']}; keepalive 64; }}
  # Static bodies answer POST through the 405 -> 200 internal redirect.
  server {{ listen 127.0.0.1:{ports['up_json']};
    location / {{ root {work}; default_type application/json; try_files /chat.json =404;
                 error_page 405 =200 $uri; }} }}
  server {{ listen 127.0.0.1:{ports['up_sse']};
    location / {{ root {work}; default_type text/event-stream; try_files /stream.txt =404;
                 error_page 405 =200 $uri; }} }}
  # nginx as a streaming reverse proxy (no buffering, keep-alive upstream): the floor.
  server {{ listen 127.0.0.1:{ports['nginx']};
    proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off;
    location / {{
      set $up up_json;
      if ($http_x_bench = "sse") {{ set $up up_sse; }}
      if ($http_x_bench = "paced") {{ set $up up_paced; }}
      proxy_pass http://$up;
    }} }}
}}
""")
    return conf


def snapshot(work: Path, ports: dict[str, int]) -> Path:
    def inst(name: str, port: int) -> dict[str, Any]:
        return {"name": name, "instances": [{"id": f"{name}-0", "worker_id": "bench",
                                             "endpoint": f"http://127.0.0.1:{port}", "weight": 100,
                                             "max_concurrency": 100000, "enabled": True, "state": "ready"}]}

    routes = {"revision": 1, "store_time": time.time(), "controller_id": "bench", "heartbeat_ttl": 6.0,
              "models": [inst("json", ports["up_json"]), inst("sse", ports["up_sse"]), inst("paced", ports["paced"])],
              "api_keys": []}
    path = work / "routes.json"
    path.write_text(json.dumps({"fetched_at": time.time(), "routes": routes}))
    return path


def litellm_conf(work: Path, ports: dict[str, int]) -> Path:
    conf = work / "litellm.yaml"
    lines = ["model_list:"]
    for name, port in (("json", ports["up_json"]), ("sse", ports["up_sse"]), ("paced", ports["paced"])):
        lines += [f"  - model_name: {name}", "    litellm_params:", "      model: openai/bench",
                  f"      api_base: http://127.0.0.1:{port}/v1", "      api_key: dummy"]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def setup_litellm() -> None:
    if (LITELLM_VENV / "bin" / "litellm").exists():
        console.print(f"LiteLLM already in {LITELLM_VENV}")
        return
    py = shutil.which("python3.11") or sys.executable
    subprocess.run([py, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description="Gateway overhead, side by side.")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--concurrency", default="1,32,256")
    ap.add_argument("--paced-streams", type=int, default=10)
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--setup-litellm", action="store_true", help="create bench/.litellm-venv and exit")
    ap.add_argument("--max-seconds", type=float, default=1500, help="stop starting runs after this")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.setup_litellm:
        setup_litellm()
        return
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install -y nginx wrk)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    litellm = LITELLM_VENV / "bin" / "litellm"
    use_litellm = not a.skip_litellm and litellm.exists()
    if not a.skip_litellm and not use_litellm:
        console.print(f"[yellow]LiteLLM not found in {LITELLM_VENV}: run with --setup-litellm first; "
                      "measuring without it[/yellow]")
    started = time.monotonic()
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mf-bench-gw-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user and must read the bodies
    (work / "chat.json").write_text(json.dumps(CHAT_BODY, separators=(",", ":")))
    (work / "stream.txt").write_text(stream_body())
    lua = work / "post.lua"
    lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                   'wrk.headers["X-Bench"] = os.getenv("XBENCH") or "json"\nwrk.body = os.getenv("BODY")\n')
    ports = {k: free_port() for k in ("up_json", "up_sse", "paced", "nginx", "mf1", "mf2", "litellm")}
    procs = Procs(work)
    load_before = os.getloadavg()
    try:
        procs.start("nginx", [nginx, "-p", str(work), "-c", str(nginx_conf(work, ports)), "-g", "daemon off;"])
        procs.start("paced", [sys.executable, "-m", "tests.fakes.scripted_upstream", "--port", str(ports["paced"]),
                              "--name", "paced", "--tokens", "100", "--token-interval", "0.002"],
                    env={"PYTHONPATH": str(ROOT)})
        snap = snapshot(work, ports)
        for name, n in (("mf1", 1), ("mf2", 2)):
            procs.start(name, [sys.executable, "-m", "modelfleet.gateway", "--host", "127.0.0.1", "--port",
                               str(ports[name]), "--snapshot-path", str(snap), "--processes", str(n),
                               "--log-level", "warning", "--controller", ""])
        if use_litellm:
            procs.start("litellm", [str(litellm), "--config", str(litellm_conf(work, ports)), "--host", "127.0.0.1",
                                    "--port", str(ports["litellm"]), "--num_workers", "1"],
                        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                             "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"})
        direct = {"json": f"http://127.0.0.1:{ports['up_json']}", "sse": f"http://127.0.0.1:{ports['up_sse']}",
                  "paced": f"http://127.0.0.1:{ports['paced']}"}
        targets = {"nginx": f"http://127.0.0.1:{ports['nginx']}", "modelfleet": f"http://127.0.0.1:{ports['mf1']}",
                   "modelfleet-2p": f"http://127.0.0.1:{ports['mf2']}"}
        if use_litellm:
            targets["litellm"] = f"http://127.0.0.1:{ports['litellm']}"
        for url in (*direct.values(), *targets.values()):
            wait_http(f"{url}/v1/chat/completions", 120, "POST", REQUEST["json"])
        check_targets(direct, targets)
        runs: list[Run] = []
        for payload in ("json", "sse"):
            for c in concurrencies:
                for target, base in (("direct", direct[payload]), *targets.items()):
                    if time.monotonic() - started > a.max_seconds:
                        console.print("[red]--max-seconds reached: stopping[/red]")
                        break
                    url = f"{base}/v1/chat/completions"
                    os.environ["XBENCH"] = payload
                    wrk(url, REQUEST[payload], c, 1.0, lua)  # warm the pools
                    r = parse_wrk(wrk(url, REQUEST[payload], c, a.duration, lua), Run(target, payload, c))
                    runs.append(r)
                    console.print(f"{payload:4} c={c:<3} {target:13} {r.rps:10.1f} req/s  p50 {r.p50_ms:8.3f} ms  "
                                  f"p99 {r.p99_ms:8.3f} ms  non-2xx {r.non_2xx}  socket errors {r.socket_errors}")
        compare(runs)
        pacing = {}
        os.environ["XBENCH"] = "paced"
        for target, base in (("direct", direct["paced"]), *targets.items()):
            if time.monotonic() - started > a.max_seconds:
                break
            try:
                pacing[target] = asyncio.run(paced(f"{base}/v1/chat/completions", a.paced_streams))
            except Exception as exc:  # a target that fell over must not cost the whole report
                console.print(f"[red]paced streams via {target} failed: {exc!r}[/red]")
        for target, p in pacing.items():
            if target != "direct" and "direct" in pacing:
                p["added_ms_per_chunk"] = round((p["total_ms"] - pacing["direct"]["total_ms"]) / 100, 4)
                p["added_ttft_ms"] = round(p["ttft_ms"] - pacing["direct"]["ttft_ms"], 3)
    finally:
        procs.stop_all()
    load_after = os.getloadavg()
    report(runs, pacing, a, load_before, load_after, time.monotonic() - started)
    shutil.rmtree(work, ignore_errors=True)


def compare(runs: list[Run]) -> None:
    """Added latency against the direct run, and ratios to nginx and LiteLLM, per cell."""
    cell: dict[tuple[str, int], dict[str, Run]] = {}
    for r in runs:
        cell.setdefault((r.payload, r.concurrency), {})[r.target] = r
    for group in cell.values():
        d, ng, ll = group.get("direct"), group.get("nginx"), group.get("litellm")
        for r in group.values():
            if d is not None and r is not d and r.requests:
                r.added_p50_ms = round(r.p50_ms - d.p50_ms, 3)
                r.added_p99_ms = round(r.p99_ms - d.p99_ms, 3)
            if ng is not None and ng.rps and r.target not in ("direct", "nginx"):
                r.pct_of_nginx = round(100 * r.rps / ng.rps, 1)
            if ll is not None and ll.rps and r.target.startswith("modelfleet"):
                r.x_litellm = round(r.rps / ll.rps, 1)


def report(runs: list[Run], pacing: dict[str, Any], a: argparse.Namespace, before: tuple[float, ...],
           after: tuple[float, ...], elapsed: float) -> None:
    t = Table(title="Gateway overhead (wrk; added = minus the upstream called directly)")
    for col in ("payload", "conc", "target", "req/s", "p50 ms", "p99 ms", "added p50", "added p99",
                "% of nginx", "× LiteLLM", "errors"):
        t.add_column(col, justify="right" if col not in ("payload", "target") else "left")

    def f(v: float | None, digits: int = 3) -> str:
        return "-" if v is None or v != v else f"{v:.{digits}f}"

    for r in runs:
        t.add_row(r.payload, str(r.concurrency), r.target, f"{r.rps:.0f}", f(r.p50_ms), f(r.p99_ms),
                  f(r.added_p50_ms), f(r.added_p99_ms), f(r.pct_of_nginx, 1), f(r.x_litellm, 1),
                  str(r.non_2xx + r.socket_errors))
    console.print(t)
    if pacing:
        pt = Table(title="Paced streams: 100 chunks, one per 2 ms (median of sequential streams)")
        for col in ("target", "first chunk ms", "[DONE] ms", "added ms per chunk"):
            pt.add_column(col)
        for target, p in pacing.items():
            pt.add_row(target, f(p.get("ttft_ms")), f(p.get("total_ms")), f(p.get("added_ms_per_chunk"), 4))
        console.print(pt)
    out = {
        "benchmark": "gateway",
        "command": "python " + " ".join(sys.argv),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in before], "load_avg_after": [round(x, 2) for x in after]},
        "duration_per_run_s": a.duration,
        "elapsed_s": round(elapsed, 1),
        "notes": "modelfleet routes from a route snapshot (no controller process); modelfleet-2p is "
                 "--processes 2 (SO_REUSEPORT); LiteLLM runs one worker; nginx proxies with keep-alive "
                 "upstreams and proxy_buffering off. Upstream: nginx with fixed bodies.",
        "runs": [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(r).items()} for r in runs],
        "paced_streams": pacing,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
