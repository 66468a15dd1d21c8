"""How many workers one controller keeps registered: heartbeats/s, latency and CPU per store.

    .venv/bin/python bench/registry.py [--workers 100,1000,2000] [--stores sqlite,postgresql,mysql,redis]
                                       [--interval 2] [--warmup 5] [--window 20]

For every store and every worker count N: a fresh private database (or Redis key prefix), one
real controller subprocess (``modelfleet controller``) on it, and N simulated workers in this
process (asyncio + aiohttp) that register, then heartbeat every ``--interval`` seconds at a
fixed rate (start times spread evenly over one interval, as real workers drift apart), each
sending back the revision it last saw, as the real agent does. After ``--warmup`` seconds,
for ``--window`` seconds it measures:

- sustained heartbeats/s answered 200, against the offered N / interval;
- p50 / p99 heartbeat latency seen by the workers (send to response, keep-alive HTTP);
- controller CPU (psutil, user + system, % of one core, children included);
- store CPU where it can be told apart: PostgreSQL backends of the private database exactly;
  MariaDB and Redis are whole shared server processes, so their number includes whatever
  else the machine's other users ran against them (marked "~");
- this load generator's own CPU, because it shares the machine's cores with the controller
  and the store: when it nears 100 % of a core, the numbers are the generator's limit.

Before that, per store, ``Store.heartbeat()`` runs in a closed loop from this process with no
HTTP for ``--direct-seconds``: the store's own ceiling, so that the controller's share of the
cost can be told from the store's.

Prints Rich tables and writes bench/results/registry.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "registry.json"
PG = ("127.0.0.1", 5432)
MY = ("127.0.0.1", 3306)
REDIS = ("127.0.0.1", 6379)
JOIN_TOKEN = "bench-join-" + uuid.uuid4().hex[:8]
# Wide enough for the table when the output is a file or a pipe.
console = Console(width=max(120, Console().width))


@dataclass
class Run:
    store: str
    workers: int
    interval_s: float
    window_s: float
    offered_hb_s: float
    sustained_hb_s: float = 0.0
    ok: int = 0
    errors: int = 0
    late: int = 0  # heartbeats sent after their slot had passed (the worker fell behind)
    registered: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    controller_cpu_pct: float = 0.0
    store_cpu_pct: float | None = None
    store_cpu_exact: bool = False
    client_cpu_pct: float = 0.0
    error_samples: list[str] = field(default_factory=list)


# -- private stores -------------------------------------------------------------------------
def port_open(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateStore:
    """A store URL nobody else uses, removed afterwards."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.name = "mf_bench_" + uuid.uuid4().hex[:10]
        self.tmp = tmp

    def available(self) -> str | None:
        addr = {"postgresql": PG, "mysql": MY, "redis": REDIS}.get(self.kind)
        if addr and not port_open(addr):
            return f"{self.kind} is not reachable on {addr[0]}:{addr[1]}"
        return None

    def create(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.tmp / self.name / 'state.db'}"
        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(f"host={PG[0]} port={PG[1]} user=postgres dbname=postgres", autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{self.name}"')
            return f"postgresql://postgres@{PG[0]}:{PG[1]}/{self.name}"
        if self.kind == "mysql":
            import pymysql

            conn = pymysql.connect(host=MY[0], port=MY[1], user="root", password="", autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{self.name}`")
            conn.close()
            return f"mysql://root@{MY[0]}:{MY[1]}/{self.name}"
        if self.kind == "redis":
            return f"redis://{REDIS[0]}:{REDIS[1]}/0?prefix={self.name}"
        raise ValueError(self.kind)

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            if self.kind == "sqlite":
                shutil.rmtree(self.tmp / self.name, ignore_errors=True)
            elif self.kind == "postgresql":
                import psycopg

                dsn = f"host={PG[0]} port={PG[1]} user=postgres dbname=postgres"
                with psycopg.connect(dsn, autocommit=True) as c:
                    c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            elif self.kind == "mysql":
                import pymysql

                conn = pymysql.connect(host=MY[0], port=MY[1], user="root", password="", autocommit=True)
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
                conn.close()
            elif self.kind == "redis":
                import redis

                r = redis.Redis(host=REDIS[0], port=REDIS[1])
                for k in r.scan_iter(f"{self.name}:*", count=1000):
                    r.delete(k)
                r.close()

    def server_procs(self) -> tuple[list[psutil.Process], bool]:
        """Processes doing this store's work, and whether they are exactly ours."""
        procs: list[psutil.Process] = []
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                name = p.info["name"] or ""
                cmd = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            # PostgreSQL names each backend after its database: "postgres: user db host(port) ...".
            if self.kind == "postgresql" and name.startswith("postgres") and f" {self.name} " in f"{cmd} ":
                procs.append(p)
            elif self.kind == "mysql" and name in ("mariadbd", "mysqld"):
                procs.append(p)
            elif self.kind == "redis" and name == "redis-server" and f":{REDIS[1]}" in cmd:
                procs.append(p)
        return procs, self.kind == "postgresql"


# -- controller subprocess -------------------------------------------------------------------
def modelfleet_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("modelfleet")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "modelfleet.cli"]


def spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        # Own process group, so stopping it stops anything it started.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return "(no log)"


async def start_controller(store_url: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        *modelfleet_cmd(),
        "controller",
        "--store",
        store_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--join-token",
        JOIN_TOKEN,
        "--log-level",
        "WARNING",
    ]
    if store_url.startswith("redis"):
        cmd.append("--allow-volatile-store")  # the shared Redis keeps nothing on disk: a benchmark does not care
    proc = spawn(cmd, log_path)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited {proc.returncode}: {log_tail(log_path)}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{base}/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return proc, base
            await asyncio.sleep(0.2)
    stop_controller(proc)
    raise RuntimeError(f"controller not ready in 60 s: {log_tail(log_path)}")


def stop_controller(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def cpu_seconds(procs: list[psutil.Process], children: bool = False) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
            if children:
                for c in p.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        ct = c.cpu_times()
                        total += ct.user + ct.system
    return total


# -- simulated workers ---------------------------------------------------------------------
def worker_info(run_id: str, i: int) -> dict[str, Any]:
    return {
        "id": f"{run_id}-w{i:05d}",
        "name": f"bench-{i:05d}",
        "address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
        "port": 8200,
        "labels": {"zone": f"z{i % 3}", "bench": "registry"},
        "resources": {
            "cpu_cores": 16,
            "memory_total": 64 << 30,
            "memory_free": 48 << 30,
            "gpus": [{"index": 0, "name": "NVIDIA L4", "memory_total": 24 << 30, "memory_free": 23 << 30}],
        },
        "version": "bench",
    }


async def measure(
    store: str, base: str, n: int, args: argparse.Namespace, server: PrivateStore, controller: subprocess.Popen[bytes]
) -> Run:
    run = Run(store=store, workers=n, interval_s=args.interval, window_s=args.window, offered_hb_s=n / args.interval)
    url = f"{base}/v1/cluster/heartbeat"
    headers = {"Authorization": f"Bearer {JOIN_TOKEN}", "Content-Type": "application/json"}
    run_id = uuid.uuid4().hex[:6]
    samples: list[tuple[float, float, bool]] = []  # (done at, latency s, ok)
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5
    warm_end = t0 + args.interval + args.warmup  # every worker registered, then warm-up
    end = warm_end + args.window
    registered = 0
    late = 0

    async def one_worker(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal registered, late
        info = orjson.dumps(worker_info(run_id, i))
        known = -1
        first = True
        slot = t0 + args.interval * i / n
        while slot < end:
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif slot >= warm_end:
                late += 1
            # The first report carries the (empty) instance list: the agent's registration.
            instances = b"[]" if first else b"null"
            body = (
                b'{"worker":' + info + b',"instances":' + instances + b',"known_revision":' + str(known).encode() + b"}"
            )
            started = time.perf_counter()
            ok = False
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    if resp.status == 200:
                        reply = orjson.loads(payload)
                        known = reply["revision"]
                        registered += bool(reply.get("registered"))
                        first = False
                        ok = True
                    elif len(errors) < 20:
                        errors.append(f"HTTP {resp.status}: {payload[:200]!r}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if len(errors) < 20:
                    errors.append(f"{type(exc).__name__}: {exc}")
            samples.append((loop.time(), time.perf_counter() - started, ok))
            slot += args.interval
            if slot < loop.time():  # fell a whole interval behind: skip the missed slots
                slot = loop.time()

    connector = aiohttp.TCPConnector(limit=args.connections, limit_per_host=args.connections)
    timeout = aiohttp.ClientTimeout(total=30)
    me = psutil.Process()
    ctl = psutil.Process(controller.pid)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = [asyncio.create_task(one_worker(i, http)) for i in range(n)]
        await asyncio.sleep(max(0.0, warm_end - loop.time()))
        store_procs, exact = server.server_procs()
        c0, s0, m0 = cpu_seconds([ctl], children=True), cpu_seconds(store_procs), cpu_seconds([me])
        w0 = loop.time()
        await asyncio.sleep(max(0.0, end - loop.time()))
        w1 = loop.time()
        c1, s1, m1 = cpu_seconds([ctl], children=True), cpu_seconds(store_procs), cpu_seconds([me])
        await asyncio.gather(*tasks)

    window = w1 - w0
    in_window = [s for s in samples if w0 <= s[0] < w1]
    lat = sorted(s[1] for s in in_window if s[2])
    run.ok = len(lat)
    run.errors = sum(not s[2] for s in in_window)
    run.sustained_hb_s = run.ok / window
    run.late = late
    run.registered = registered
    if lat:
        run.p50_ms = statistics.median(lat) * 1000
        run.p99_ms = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        run.max_ms = lat[-1] * 1000
    run.controller_cpu_pct = (c1 - c0) / window * 100
    run.store_cpu_pct = (s1 - s0) / window * 100 if store_procs else None
    run.store_cpu_exact = exact
    run.client_cpu_pct = (m1 - m0) / window * 100
    run.error_samples = errors[:5]
    return run


# -- the store alone ------------------------------------------------------------------------
@dataclass
class Direct:
    store: str
    workers: int
    concurrency: int
    seconds: float
    hb_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_pct: float = 0.0  # this process: Store client code, driver and event loop


async def measure_direct(kind: str, url: str, n: int, args: argparse.Namespace) -> Direct:
    """Store.heartbeat() in a closed loop from this process, no HTTP: the store's own ceiling,
    to tell store cost from controller cost in the table above."""
    from modelfleet.models import WorkerInfo
    from modelfleet.store import open_store

    store = open_store(url)
    await store.migrate()
    infos = [WorkerInfo.model_validate(worker_info("direct", i)) for i in range(n)]
    for w in infos:  # registration is not what is measured here
        await store.heartbeat(w, [])
    lat: list[float] = []
    me = psutil.Process()
    stop = time.monotonic() + args.direct_seconds

    async def loop(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            started = time.perf_counter()
            await store.heartbeat(infos[i % n])
            lat.append(time.perf_counter() - started)
            i += args.direct_concurrency

    c0, t0 = cpu_seconds([me]), time.monotonic()
    await asyncio.gather(*(loop(k) for k in range(args.direct_concurrency)))
    c1, t1 = cpu_seconds([me]), time.monotonic()
    await store.close()
    lat.sort()
    return Direct(
        store=kind,
        workers=n,
        concurrency=args.direct_concurrency,
        seconds=t1 - t0,
        hb_s=len(lat) / (t1 - t0),
        p50_ms=statistics.median(lat) * 1000 if lat else None,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None,
        cpu_pct=(c1 - c0) / (t1 - t0) * 100,
    )


def direct_table(rows: list[Direct]) -> Table:
    t = Table(title="Store alone: Store.heartbeat() from one process, no HTTP")
    for col in ("store", "workers", "concurrency", "hb/s", "p50 ms", "p99 ms", "process CPU%"):
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in rows:
        t.add_row(
            r.store,
            str(r.workers),
            str(r.concurrency),
            fmt(r.hb_s, ".0f"),
            fmt(r.p50_ms, ".2f"),
            fmt(r.p99_ms, ".2f"),
            fmt(r.cpu_pct, ".0f"),
        )
    return t


# -- main ----------------------------------------------------------------------------------
def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(runs: list[Run]) -> Table:
    t = Table(title="Controller registry: simulated workers heartbeating one controller")
    for col in (
        "store",
        "workers",
        "offered/s",
        "hb/s",
        "p50 ms",
        "p99 ms",
        "err",
        "late",
        "ctl CPU%",
        "store CPU%",
        "gen CPU%",
    ):
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in runs:
        store_cpu = fmt(r.store_cpu_pct, ".0f")
        if r.store_cpu_pct is not None and not r.store_cpu_exact:
            store_cpu = "~" + store_cpu
        t.add_row(
            r.store,
            str(r.workers),
            fmt(r.offered_hb_s, ".0f"),
            fmt(r.sustained_hb_s, ".0f"),
            fmt(r.p50_ms, ".2f"),
            fmt(r.p99_ms, ".2f"),
            str(r.errors),
            str(r.late),
            fmt(r.controller_cpu_pct, ".0f"),
            store_cpu,
            fmt(r.client_cpu_pct, ".0f"),
        )
    return t


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="100,1000,2000", help="comma-separated worker counts, e.g. 100,500,5000")
    ap.add_argument("--stores", default="sqlite,postgresql,mysql,redis")
    ap.add_argument("--interval", type=float, default=2.0, help="heartbeat interval, seconds")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds after every worker registered")
    ap.add_argument("--window", type=float, default=20.0, help="measured seconds")
    ap.add_argument(
        "--connections",
        type=int,
        default=256,
        help="HTTP keep-alive connections the simulated workers share (real workers have one each)",
    )
    ap.add_argument(
        "--direct-seconds",
        type=float,
        default=5.0,
        help="seconds of Store.heartbeat() without HTTP per store (0: skip)",
    )
    ap.add_argument("--direct-concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]

    runs: list[Run] = []
    direct: list[Direct] = []
    skipped: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="mf-bench-registry-"))
    try:
        for store in stores:
            if args.direct_seconds > 0:
                server = PrivateStore(store, tmp)
                if not server.available():
                    try:
                        row = await measure_direct(store, server.create(), max(counts), args)
                        direct.append(row)
                        console.print(f"{store}: store alone {row.hb_s:.0f} hb/s, p50 {fmt(row.p50_ms, '.2f')} ms")
                    finally:
                        server.drop()
            for n in counts:
                server = PrivateStore(store, tmp)
                why = server.available()
                if why:
                    skipped[store] = why
                    console.print(f"[yellow]skip {store}: {why}")
                    break
                url = server.create()
                controller = None
                try:
                    controller, base = await start_controller(url, tmp / f"controller-{store}-{n}.log")
                    console.print(f"{store}: {n} workers ...")
                    run = await measure(store, base, n, args, server, controller)
                    runs.append(run)
                    console.print(
                        f"  {run.sustained_hb_s:.0f}/{run.offered_hb_s:.0f} hb/s, p50 {fmt(run.p50_ms, '.2f')} ms, "
                        f"p99 {fmt(run.p99_ms, '.2f')} ms, errors {run.errors}, controller CPU "
                        f"{run.controller_cpu_pct:.0f} %"
                    )
                    for e in run.error_samples:
                        console.print(f"  [red]{e}")
                finally:
                    if controller is not None:
                        stop_controller(controller)
                    server.drop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if direct:
        console.print(direct_table(direct))
    console.print(table(runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "registry",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0],
                },
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "note": "controller, store servers and this load generator share the same machine; "
                "store CPU is exact for PostgreSQL (backends of the private database), whole-server "
                "for MariaDB and Redis",
                "skipped": skipped,
                "runs": [asdict(r) for r in runs],
                "store_alone": [asdict(r) for r in direct],
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
