"""The failure matrix (issue 9): each scenario breaks a real cluster one way under a real HTTP
load and returns one row: scenario, load, requests sent, failed, time to detect, time to
recover, verdict. bench/chaos.py runs all of them (`make chaos`); tests/chaos/test_matrix.py
runs the fast ones in `make test` and asserts every verdict.

Every part is a real process (tests/support/procs.py): controllers, workers, gateways,
private store servers (tests/support/stores.py). Instances are the scripted OpenAI servers of
tests/fakes (subprocesses, so kill -9 is real), declared by a fake or a real worker agent.

What "detect" and "recover" measure is per scenario (``Result.detect`` / ``recover`` say
what); both count from the moment the fault was injected (for an outage, recover counts from
the moment it ended). None: not applicable.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port
from tests.gateway.conftest import ADMIN, JOIN, PY, Cluster, FakeWorker, admin_h
from tests.gateway.load import Load, chat_body, run_load
from tests.support.procs import MODELFLEET, Procs

CONCURRENCY = 8


@dataclass
class Result:
    scenario: str
    load: str
    sent: int = 0
    failed: int = 0
    detect_s: float | None = None
    recover_s: float | None = None
    ok: bool = False
    detect: str = ""  # what "detected" means here
    recover: str = ""  # what "recovered" means here
    note: str = ""
    checks: list[str] = field(default_factory=list)  # every failed expectation, one line each

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "FAIL"

    def expect(self, cond: object, what: str) -> bool:
        """Record a failed expectation (the scenario goes on, so one run shows every problem)."""
        if not cond:
            self.checks.append(what)
        return bool(cond)

    def finish(self, extra_ok: bool = True) -> Result:
        self.ok = extra_ok and not self.checks and self.failed == 0
        return self

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


Scenario = Callable[[Procs, Path], Awaitable[Result]]
SCENARIOS: dict[str, tuple[Scenario, bool]] = {}  # name -> (driver, fast)


def scenario(name: str, fast: bool = False) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = (fn, fast)
        return fn

    return register


def fast_scenarios() -> list[str]:
    return [n for n, (_, fast) in SCENARIOS.items() if fast]


async def run_scenario(name: str, base: Path) -> Result:
    """One scenario in its own folder, its processes stopped afterwards whatever happened;
    an exception is a failed row carrying its reason."""
    fn, _ = SCENARIOS[name]
    tmp = base / name
    tmp.mkdir(parents=True, exist_ok=True)
    procs = Procs(tmp)
    try:
        return await fn(procs, tmp)
    except Exception as exc:
        tb = traceback.format_exc(limit=3)
        return Result(name, "-", note=f"{type(exc).__name__}: {exc}"[:400], checks=[tb[-800:]])
    finally:
        await asyncio.to_thread(stop_together, [p.stop for p in procs.all])


def stop_together(stops: list[Callable[[], None]]) -> None:
    """Teardown in parallel: each clean stop waits for its process."""
    threads = [threading.Thread(target=f) for f in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


async def until(pred: Callable[[], Any], within: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` in a thread (it may block) without stalling the load beside it."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(pred)
        except httpx.HTTPError as exc:
            last = exc
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")


async def timed(pred: Callable[[], Any], t0: float, within: float, what: str) -> float:
    await until(pred, within, what)
    return round(time.monotonic() - t0, 2)


async def post(url: str, **kw: Any) -> httpx.Response:
    """A blocking POST in a thread: a load may be running on this event loop."""
    return await asyncio.to_thread(httpx.post, url, timeout=10, **kw)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Background:
    """A load of ``CONCURRENCY`` chat requests through the gateway until stopped."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, concurrency: int = CONCURRENCY) -> None:
        self.stop = asyncio.Event()
        self.concurrency = concurrency
        self.task = asyncio.create_task(
            run_load(f"{url}/v1/chat/completions", 10**8, concurrency, chat_body(), headers, stop=self.stop)
        )

    async def end(self) -> Load:
        self.stop.set()
        return await self.task

    def describe(self) -> str:
        return f"{self.concurrency} concurrent chat requests"


def tally(r: Result, load: Load, minimum: int = 50) -> None:
    r.sent, r.failed = len(load.outcomes), len(load.failed)
    r.expect(r.sent >= minimum, f"only {r.sent} requests were sent (the load did not run)")
    if load.failed:
        first = load.failed[0]
        r.note = f"first failure: {first.status} {first.error[:150]}"


def two_instances(cluster: Cluster, *gateway_args: str, controllers: int = 1) -> Cluster:
    """Controllers on the cluster's store, instances a and b of model ``m`` (scripted servers)
    declared by a fake worker, a gateway; waits until both route."""
    for _ in range(controllers):
        cluster.controller()
    worker = cluster.start_worker()
    for name in ("a", "b"):
        worker.declare(f"w1/{name}", "m", cluster.upstream(name, "--latency", "0.02"))
    cluster.gateway(*gateway_args)
    cluster.wait_routable("m", 2)
    return cluster


def restart_upstream(cluster: Cluster, name: str) -> None:
    """The scripted server ``name`` again, on its port (as a worker's supervisor restarts a runner)."""
    old, url = cluster.upstreams[name]
    old.kill()
    cluster.upstream(name, "--latency", "0.02", port=int(url.rsplit(":", 1)[1]))


# -- node and process failures (bench only: each takes tens of seconds) ---------------------------
@scenario("runner kill -9")
async def runner_kill(procs: Procs, tmp: Path) -> Result:
    r = Result(
        "runner kill -9", "", detect="the gateway ejected the instance", recover="the restarted instance serves again"
    )
    cluster = two_instances(Cluster(procs, tmp), "--eject-cooldown-s", "1")
    load = Background(cluster.gateway_url)
    r.load = load.describe()
    await asyncio.sleep(2)
    t0 = time.monotonic()
    cluster.upstreams["a"][0].kill()
    r.detect_s = await timed(
        lambda: (cluster.instance_view("w1/a") or {}).get("ejections", 0) >= 1, t0, 15, "instance a ejected"
    )
    await asyncio.to_thread(restart_upstream, cluster, "a")  # a fresh process: its counts start at 0
    r.recover_s = await timed(lambda: cluster.upstream_stats("a")["requests"] > 0, t0, 30, "instance a serving again")
    await asyncio.sleep(2)
    tally(r, await load.end())
    assert cluster.worker is not None
    cluster.worker.stop()
    return r.finish()


@scenario("worker kill -9")
async def worker_kill(procs: Procs, tmp: Path) -> Result:
    """Two real worker agents, each attaching one scripted server as model ``m``; worker A's
    agent dies by kill -9 (its instance's server with it: same process group)."""
    r = Result(
        "worker kill -9",
        "",
        detect="the controller lists the worker dead",
        recover="the restarted worker is alive and both instances route again",
    )
    cluster = Cluster(procs, tmp)
    ctl = cluster.controller()
    workers = {}
    for name in ("a", "b"):
        url = cluster.upstream(name, "--latency", "0.02")
        workers[name] = start_worker(procs, name, ctl, url)
    for w in workers.values():
        await asyncio.to_thread(w.wait_ready, 60)
    cluster.gateway()
    await asyncio.to_thread(cluster.wait_routable, "m", 2, 30)
    load = Background(cluster.gateway_url)
    r.load = load.describe()
    await asyncio.sleep(2)
    t0 = time.monotonic()
    workers["a"].kill(signal.SIGKILL)
    cluster.upstreams["a"][0].kill(signal.SIGKILL)  # the machine's instance goes with it

    def dead() -> bool:
        ws = httpx.get(f"{ctl}/v1/cluster/workers", headers=admin_h(), timeout=5).json()["data"]
        return any(w["name"] == "wk-a" and not w["alive"] for w in ws)

    r.detect_s = await timed(dead, t0, 30, "worker a seen dead")
    url = cluster.upstream("a", "--latency", "0.02", port=int(cluster.upstreams["a"][1].rsplit(":", 1)[1]))
    workers["a"] = start_worker(procs, "a", ctl, url)
    r.recover_s = await timed(lambda: routable(cluster, "m") == 2, t0, 60, "both instances routable again")
    await asyncio.sleep(2)
    tally(r, await load.end())
    return r.finish()


def start_worker(procs: Procs, name: str, ctl: str, upstream: str) -> Any:
    return procs.worker(
        f"wk-{name}",
        free_port(),
        ctl,
        "--join-token",
        JOIN,
        "--heartbeat-interval",
        "0.5",
        "--model",
        f"m=openai:{upstream}",
        "--runner-port-start",
        str(free_port()),
    )


def routable(cluster: Cluster, model: str) -> int:
    for m in cluster.status()["models"]:
        if m["name"] == model:
            return sum(1 for i in m["instances"] if i["enabled"])
    return 0


@scenario("controller kill -9")
async def controller_kill(procs: Procs, tmp: Path) -> Result:
    r = Result(
        "controller kill -9",
        "",
        detect="the gateway polls the other controller",
        recover="the restarted controller is ready",
    )
    cluster = two_instances(Cluster(procs, tmp), controllers=2)
    first = cluster.controller_urls[0]
    await until(lambda: cluster.status()["route_table"]["controller"] == first, 10, "gateway on the first")
    load = Background(cluster.gateway_url)
    r.load = load.describe()
    await asyncio.sleep(2)
    t0 = time.monotonic()
    cluster.kill_controller(0)
    r.detect_s = await timed(
        lambda: cluster.status()["route_table"]["controller"] == cluster.controller_urls[1],
        t0,
        30,
        "the gateway on the second controller",
    )
    await asyncio.to_thread(cluster.restart_controller, 0)
    r.recover_s = await timed(lambda: ready(first), t0, 60, "the first controller ready again")
    await asyncio.sleep(2)
    tally(r, await load.end())
    return r.finish()


async def _all_down(cluster: Cluster, r: Result, restart_gateway: bool) -> None:
    load = Background(cluster.gateway_url)
    r.load = load.describe()
    await asyncio.sleep(2)
    t0 = time.monotonic()
    for i in range(len(cluster.controllers)):
        cluster.kill_controller(i)
    r.detect_s = await timed(
        lambda: cluster.status()["route_table"]["state"] == "stale", t0, 30, "the gateway's table stale"
    )
    first = None
    if restart_gateway:
        # The load stops while the gateway process is replaced (no process answers then), then
        # starts again against the new one, which has only its snapshot.
        first = await load.end()
        await asyncio.to_thread(cluster.restart_gateway)
        r.expect(cluster.status()["route_table"]["source"] != "controller", "restarted gateway served from snapshot")
        load = Background(cluster.gateway_url)
        r.note = f"before the gateway restart: {len(first.outcomes)} sent, {len(first.failed)} failed"
    await asyncio.sleep(10)
    # Both controllers start again together; recovery counts from the moment one answers.
    urls = cluster.controller_urls
    one_back = asyncio.create_task(until(lambda: any(ready(u) for u in urls), 60, "a controller back"))
    await asyncio.gather(*(asyncio.to_thread(cluster.restart_controller, i) for i in range(len(urls))))
    await one_back
    back = time.monotonic()
    r.recover_s = await timed(lambda: cluster.status()["route_table"]["state"] == "fresh", back, 60, "fresh again")
    await asyncio.sleep(2)
    tally(r, await load.end())
    if first is not None:
        r.sent += len(first.outcomes)
        r.failed += len(first.failed)


@scenario("all controllers down")
async def all_controllers_down(procs: Procs, tmp: Path) -> Result:
    r = Result(
        "all controllers down",
        "",
        detect="the gateway marks its table stale",
        recover="the gateway's table fresh after the controllers return (from their return)",
    )
    cluster = two_instances(Cluster(procs, tmp), controllers=2)
    await _all_down(cluster, r, restart_gateway=False)
    return r.finish()


@scenario("gateway restart during the outage")
async def gateway_restart(procs: Procs, tmp: Path) -> Result:
    r = Result(
        "gateway restart during the outage",
        "",
        detect="the gateway marks its table stale",
        recover="the gateway's table fresh after the controllers return (from their return)",
    )
    cluster = two_instances(Cluster(procs, tmp), controllers=2)
    await _all_down(cluster, r, restart_gateway=True)
    return r.finish()


# -- the store ------------------------------------------------------------------------------------
STORE_HEARTBEAT_S = 2.0  # the default: workers are dead after 6 s without a heartbeat


def start_in_parallel(cluster: Cluster) -> None:
    """Two controllers on the cluster's store, two scripted instances and the worker declaring
    them: started together (each Python process takes seconds to start on a busy machine)."""
    ports = [free_port(), free_port()]
    controllers = [
        cluster.procs.controller(
            f"ctl-{p}",
            p,
            cluster.store,
            "--admin-token",
            ADMIN,
            "--join-token",
            JOIN,
            "--heartbeat-interval",
            str(STORE_HEARTBEAT_S),
            wait=False,
        )
        for p in ports
    ]
    upstreams = {}
    for name in ("a", "b"):
        port = free_port()
        upstreams[name] = cluster.procs.start(
            f"up-{name}",
            [PY, "-m", "tests.fakes.scripted_upstream", "--port", str(port), "--name", name, "--latency", "0.02"],
            ready_url=f"http://127.0.0.1:{port}/health",
        )
    for p, proc in zip(ports, controllers, strict=True):
        proc.wait_ready(60)
        cluster.controllers.append((proc, f"http://127.0.0.1:{p}"))
    worker = cluster.worker = FakeWorker(cluster.controller_urls, interval=STORE_HEARTBEAT_S).start()
    for name, proc in upstreams.items():
        proc.wait_ready(30)
        url = proc.ready_url.rsplit("/", 1)[0]
        cluster.upstreams[name] = (proc, url)
        worker.declare(f"w1/{name}", "m", url)


def store_restart(backend: str, down_s: float = 10.0, after_s: float = 10.0) -> Scenario:
    """Two controllers on a private ``backend`` server, workers heartbeating at the default
    interval, the server stopped for ``down_s`` and started again under load (issue 9 §1)."""

    async def run(procs: Procs, tmp: Path) -> Result:
        from tests.support.stores import _SERVERS

        r = Result(
            f"store stopped and restarted ({backend})",
            "",
            detect="every controller reports not ready",
            recover="every controller ready again (from the store's return)",
        )
        server = await asyncio.to_thread(_SERVERS[backend])
        try:
            await asyncio.to_thread(server.start)
            await store_outage(procs, tmp, server, r, down_s, after_s)
        finally:
            await asyncio.to_thread(stop_together, [p.stop for p in procs.all] + [server.destroy])
        return r.finish()

    return run


async def store_outage(procs: Procs, tmp: Path, server: Any, r: Result, down_s: float, after_s: float) -> Load:
    """The store-outage run on ``server`` (started): also what tests/chaos/test_store_outage.py drives."""
    cluster = Cluster(procs, tmp)
    cluster.store = server.url
    await asyncio.to_thread(start_in_parallel, cluster)
    try:
        cluster.gateway()
        cluster.wait_routable("m", 2)
        load = Background(cluster.gateway_url)
        r.load = load.describe()
        await asyncio.sleep(1.5)
        t0 = time.monotonic()
        await asyncio.to_thread(server.stop)
        r.detect_s = await timed(
            lambda: not any(ready(u) for u in cluster.controller_urls), t0, 15, "controllers to see the store gone"
        )
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - t0)))
        await asyncio.to_thread(server.start)
        back = time.monotonic()
        r.recover_s = await timed(
            lambda: all(ready(u) for u in cluster.controller_urls), back, 30, "controllers ready again"
        )
        await asyncio.sleep(after_s)
        result = await load.end()
        tally(r, result, minimum=200)
        served = set(result.by_instance())
        r.expect({"w1/a", "w1/b"} <= served, f"both instances served: {served}")
        r.expect(routable(cluster, "m") == 2, "the gateway routes to both after the outage")
        return result
    finally:
        if cluster.worker is not None:
            cluster.worker.stop()


for _backend in ("postgresql", "mariadb", "redis"):
    scenario(f"store stopped and restarted ({_backend})")(store_restart(_backend))


@scenario("Redis without persistence")
async def redis_volatile(procs: Procs, tmp: Path) -> Result:
    """A controller refuses a Redis that keeps nothing (unless allowed); allowed, the Redis
    restarts empty under load: keys stay required and keyed requests go on being served."""
    from tests.support.stores import PrivateRedis

    r = Result("Redis without persistence", "", detect="the controller reports the store lost its state", recover="-")
    server = await asyncio.to_thread(PrivateRedis, False)
    try:
        await asyncio.to_thread(server.start)
        refused = await asyncio.to_thread(
            subprocess.run,
            [*MODELFLEET, "controller", "--store", server.url, "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        last = (refused.stderr.strip().splitlines() or [""])[-1]
        r.expect(
            refused.returncode != 0 and "--allow-volatile-store" in last,
            f"a volatile Redis is refused without the flag, in one line: {last!r}",
        )
        cluster = Cluster(procs, tmp)
        cluster.store = server.url
        ctl = cluster.controller(None, "--allow-volatile-store")
        worker = cluster.start_worker()
        for name in ("a", "b"):
            worker.declare(f"w1/{name}", "m", cluster.upstream(name, "--latency", "0.02"))
        key = (await post(f"{ctl}/v1/cluster/keys", json={"name": "ci"}, headers=admin_h())).json()["key"]
        cluster.gateway()
        cluster.wait_routable("m", 2)
        await until(lambda: chat_status(cluster.gateway_url) == 401, 10, "keys required")
        keyed = Background(cluster.gateway_url, {"authorization": f"Bearer {key}"}, 4)
        r.load = f"{keyed.describe()} with a key, 2 without"
        anonymous = Background(cluster.gateway_url, None, 2)
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)  # empty
        r.detect_s = await timed(
            lambda: httpx.get(f"{ctl}/health/ready", timeout=5).json()["store_state_lost"],
            t0,
            15,
            "the controller sees the loss",
        )
        await asyncio.sleep(3)
        with_key, without = await keyed.end(), await anonymous.end()
        tally(r, with_key)
        statuses = {o.status for o in without.outcomes}
        r.expect(without.outcomes and statuses == {401}, f"requests without a key all refused: {statuses}")
        r.sent += len(without.outcomes)
        await asyncio.to_thread(cluster.restart_gateway)
        r.expect(
            chat_status(cluster.gateway_url, key) == 200 and chat_status(cluster.gateway_url) == 401,
            "a gateway restarted on the snapshot keeps the key required",
        )
        worker.stop()
    finally:
        await asyncio.to_thread(stop_together, [p.stop for p in procs.all] + [server.destroy])
    return r.finish()


def chat_status(gateway: str, key: str | None = None, model: str = "m") -> int:
    return chat(gateway, key, model).status_code


def chat(gateway: str, key: str | None = None, model: str = "m") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gateway}/v1/chat/completions", json=chat_body(model), headers=headers, timeout=10)


# -- fast scenarios: also in `make test` ----------------------------------------------------------
SCHEMATHESIS_EXAMPLES = 25  # per operation; tests/chaos/test_matrix.py uses fewer
# coverage: boundary and type-confusion values of every field (what found the bugs so far);
# fuzzing: random bodies, SCHEMATHESIS_EXAMPLES per operation. make test runs coverage only.
SCHEMATHESIS_PHASES = "examples,coverage,fuzzing"
# Above the longest wait the documents allow (the routes long-poll's ``wait`` <= 120 s): a call
# that waits as documented is no network error.
SCHEMATHESIS_CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,negative_data_rejection"


class FullCluster:
    """A controller, a real worker agent attaching a scripted server as model MODEL, a gateway,
    with admin and join tokens: the roles the fuzzers and the auth checks talk to. The names
    are ones a fuzzer holding the admin token will not make up (a deployment it creates named
    like the served model would, rightly, change what serves it)."""

    MODEL, WORKER = "probe-7f3a", "wk-probe-7f3a"

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.cluster = Cluster(procs, tmp)
        self.ctl = self.cluster.controller()
        up = self.cluster.upstream("a")
        self.worker_port = free_port()
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        self.worker = procs.worker(
            self.WORKER,
            self.worker_port,
            self.ctl,
            "--join-token",
            JOIN,
            "--heartbeat-interval",
            "0.5",
            "--model",
            f"{self.MODEL}=openai:{up}",
            "--runner-port-start",
            str(free_port()),
            env={"MODELFLEET_HOME": str(tmp / "worker-home")},
        )
        self.worker.wait_ready(60)
        self.gateway = self.cluster.gateway()
        self.cluster.wait_routable(self.MODEL, 1, 30)


def schemathesis(
    openapi_url: str, base_url: str, headers: dict[str, str], examples: int, log: Path, *extra: str
) -> tuple[int, int, str]:
    """Runs schemathesis's CLI against a live role. Returns (exit code, test cases sent, the
    tail of its report); the whole report is ``log``, its JSON next to it."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    # fmt: off
    cmd = [exe, "--no-color", "run", openapi_url, "--url", base_url, "--checks", SCHEMATHESIS_CHECKS,
           "--max-examples", str(examples), "--phases", SCHEMATHESIS_PHASES, "--seed", "1",
           "--request-timeout", "125", "--output-sanitize", "false",
           "--report", "json", "--report-json-path", str(log.with_suffix(".json")), *extra]
    # fmt: on
    for k, v in headers.items():
        cmd += ["--header", f"{k}: {v}"]
    # In the scenario's folder: schemathesis keeps a cache of past failures (.schemathesis/) in
    # its working directory and replays them first; each run starts clean.
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=log.parent)
    text = out.stdout + out.stderr
    log.write_text(text)
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", text))
    return out.returncode, cases, "\n".join(text.strip().splitlines()[-25:])


HEARTBEAT = "/v1/cluster/heartbeat"


async def _fuzz(procs: Procs, tmp: Path, role: str) -> Result:
    """schemathesis against ``role``'s OpenAPI document, with that role's credential: the
    controller's management API with the admin token and its heartbeat with the join token,
    the worker's with the join token, the gateway's inference routes (no key is set)."""
    r = Result(
        f"bad input: {role} (schemathesis)",
        f"schemathesis: {SCHEMATHESIS_PHASES.replace(',', ', ')}; {SCHEMATHESIS_EXAMPLES} examples per operation",
        detect="-",
        recover="-",
    )
    fc = await asyncio.to_thread(FullCluster, procs, tmp)
    admin, join = {"authorization": f"Bearer {ADMIN}"}, {"authorization": f"Bearer {JOIN}"}
    runs = {
        "controller": [(fc.ctl, admin, ("--exclude-path", HEARTBEAT)), (fc.ctl, join, ("--include-path", HEARTBEAT))],
        "worker": [(fc.worker_url, join, ())],
        "gateway": [(fc.gateway, {}, ())],
    }[role]
    for n, (base, headers, extra) in enumerate(runs):
        log = tmp / f"schemathesis-{role}-{n}.log"
        rc, cases, tail = await asyncio.to_thread(
            schemathesis, f"{base}/openapi.json", base, headers, SCHEMATHESIS_EXAMPLES, log, *extra
        )
        r.sent += cases
        r.expect(rc == 0, f"schemathesis found problems (exit {rc}), report {log}:\n{tail}")
        r.expect(cases > 0, f"schemathesis ran no case ({log})")
    # No input stops the cluster: every role still answers, and a normal request is served
    # (with a key made now: the fuzzer, holding the admin token, may have made keys itself).
    for name, url in (("controller", fc.ctl), ("worker", fc.worker_url), ("gateway", fc.gateway)):
        r.expect(ready(url), f"the {name} is still ready after the fuzzing")
    key = (await post(f"{fc.ctl}/v1/cluster/keys", json={"name": "after"}, headers=admin_h())).json()["key"]
    try:
        await until(lambda: chat_status(fc.gateway, key, fc.MODEL) == 200, 15, "a normal request served")
    except AssertionError:
        last = await asyncio.to_thread(chat, fc.gateway, key, fc.MODEL)
        r.expect(False, f"the gateway still serves a normal request: {last.status_code} {last.text[:300]}")
    if r.checks:
        r.failed = 1
    return r.finish()


for _role in ("controller", "worker", "gateway"):
    scenario(f"bad input: {_role} (schemathesis)", fast=True)(lambda procs, tmp, role=_role: _fuzz(procs, tmp, role))


@scenario("auth", fast=True)
async def auth(procs: Procs, tmp: Path) -> Result:
    """No key, a wrong key, a revoked key, no join token, no admin token, against every role;
    and no response of any role (bodies, headers) ever carries the admin token, the join token
    or an API key's secret."""
    r = Result(
        "auth",
        "every role, without and with each credential",
        detect="a revoked key refused by the gateway",
        recover="-",
    )
    fc = await asyncio.to_thread(FullCluster, procs, tmp)
    ctl, gw, wk = fc.ctl, fc.gateway, fc.worker_url
    seen: list[httpx.Response] = []

    def call(method: str, url: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        resp = httpx.request(method, url, headers=headers, timeout=10, **kw)
        seen.append(resp)
        return resp

    created = call("POST", f"{ctl}/v1/cluster/keys", ADMIN, json={"name": "kept"})
    kept = created.json().get("key", "")
    key_created = call("POST", f"{ctl}/v1/cluster/keys", ADMIN, json={"name": "revoked"}).json()
    doomed, doomed_id = key_created.get("key", ""), key_created.get("id", "")
    secrets = {"admin token": ADMIN, "join token": JOIN, "API key": kept, "revoked API key": doomed}
    model = fc.MODEL
    body = chat_body(model)
    await until(
        lambda: chat_status(gw, None, model) == 401 and chat_status(gw, doomed, model) == 200,
        15,
        "the gateway knows the keys",
    )
    expected = [
        ("gateway inference, no key", lambda: call("POST", f"{gw}/v1/chat/completions", json=body), 401),
        ("gateway inference, wrong key", lambda: call("POST", f"{gw}/v1/chat/completions", "sk-wrong", json=body), 401),
        ("gateway inference, the key", lambda: call("POST", f"{gw}/v1/chat/completions", kept, json=body), 200),
        ("gateway models, no key", lambda: call("GET", f"{gw}/v1/models"), 401),
        (
            "gateway embeddings, no key",
            lambda: call("POST", f"{gw}/v1/embeddings", json={"model": model, "input": "x"}),
            401,
        ),
        ("gateway status, no admin token", lambda: call("GET", f"{gw}/v1/gateway/status"), 401),
        ("gateway status, an API key", lambda: call("GET", f"{gw}/v1/gateway/status", kept), 401),
        ("gateway cluster proxy, no admin token", lambda: call("GET", f"{gw}/v1/cluster/workers"), 401),
        ("controller workers, no admin token", lambda: call("GET", f"{ctl}/v1/cluster/workers"), 401),
        ("controller workers, wrong admin token", lambda: call("GET", f"{ctl}/v1/cluster/workers", "nope"), 403),
        ("controller workers, an API key", lambda: call("GET", f"{ctl}/v1/cluster/workers", kept), 403),
        (
            "controller deploy, no admin token",
            lambda: call(
                "POST",
                f"{ctl}/v1/cluster/deployments",
                json={"name": "x", "backend": "openai", "source": "http://127.0.0.1:9"},
            ),
            401,
        ),
        (
            "controller deploy, the join token",
            lambda: call(
                "POST",
                f"{ctl}/v1/cluster/deployments",
                JOIN,
                json={"name": "x", "backend": "openai", "source": "http://127.0.0.1:9"},
            ),
            403,
        ),
        (
            "controller keys, the join token",
            lambda: call("POST", f"{ctl}/v1/cluster/keys", JOIN, json={"name": "x"}),
            403,
        ),
        (
            "controller heartbeat, no join token",
            lambda: call(
                "POST",
                f"{ctl}/v1/cluster/heartbeat",
                json={"worker": {"id": "intruder", "name": "i", "address": "h", "port": 1}},
            ),
            403,
        ),
        (
            "controller heartbeat, wrong join token",
            lambda: call(
                "POST",
                f"{ctl}/v1/cluster/heartbeat",
                "nope",
                json={"worker": {"id": "intruder", "name": "i", "address": "h", "port": 1}},
            ),
            403,
        ),
        (
            "controller heartbeat, an API key",
            lambda: call(
                "POST",
                f"{ctl}/v1/cluster/heartbeat",
                kept,
                json={"worker": {"id": "intruder", "name": "i", "address": "h", "port": 1}},
            ),
            403,
        ),
        ("worker instances, no token", lambda: call("GET", f"{wk}/v1/instances"), 401),
        ("worker instances, wrong token", lambda: call("GET", f"{wk}/v1/instances", "nope"), 403),
        ("worker model pull, no token", lambda: call("POST", f"{wk}/v1/models/pull", json={"source": "hf://a/b"}), 401),
    ]
    for what, do, status in expected:
        got = await asyncio.to_thread(do)
        r.sent += 1
        # A missing credential is 401 (403 for the join token), a wrong one 403 (src/modelfleet/auth.py).
        if not r.expect(got.status_code == status, f"{what}: {got.status_code}, expected {status}"):
            r.failed += 1
    intruder = call("GET", f"{ctl}/v1/cluster/workers/intruder", ADMIN)
    r.expect(intruder.status_code == 404, "no worker registered without the join token")

    t0 = time.monotonic()
    r.expect(call("DELETE", f"{ctl}/v1/cluster/keys/{doomed_id}", ADMIN).status_code in (200, 204), "key revoked")
    r.detect_s = await timed(lambda: chat_status(gw, doomed, model) == 401, t0, 15, "the revoked key refused")
    r.sent += 1
    r.expect(chat_status(gw, kept, model) == 200, "the kept key still served")

    # Every read an operator or a worker makes, with full rights: none carries a secret.
    reads = [
        f"{ctl}/v1/cluster/workers",
        f"{ctl}/v1/cluster/instances",
        f"{ctl}/v1/cluster/deployments",
        f"{ctl}/v1/cluster/models",
        f"{ctl}/v1/cluster/keys",
        f"{ctl}/v1/cluster/routes",
        f"{ctl}/v1/cluster/leader",
        f"{ctl}/v1/cluster/workers/{fc.WORKER}",
        f"{ctl}/health/ready",
        f"{ctl}/metrics",
        f"{ctl}/openapi.json",
        f"{gw}/v1/gateway/status",
        f"{gw}/v1/models",
        f"{gw}/health/ready",
        f"{gw}/metrics",
        f"{gw}/openapi.json",
        f"{gw}/v1/cluster/workers",
        f"{gw}/v1/cluster/keys",
        f"{gw}/",
        f"{wk}/v1/instances",
        f"{wk}/health/ready",
        f"{wk}/metrics",
        f"{wk}/v1/models/cache",
        f"{wk}/openapi.json",
    ]
    for url in reads:
        await asyncio.to_thread(call, "GET", url, JOIN if url.startswith(wk) else ADMIN)
        r.sent += 1
    await asyncio.to_thread(call, "GET", f"{gw}/v1/models", kept)
    # The gateway's OpenAPI document is public, but names the served models only to a key holder.
    for token, names in ((None, None), ("sk-wrong", None), (kept, [model])):
        doc = (await asyncio.to_thread(call, "GET", f"{gw}/openapi.json", token)).json()
        body_schema = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
        r.sent += 1
        if not r.expect(body_schema["schema"]["properties"]["model"].get("enum") == names, f"models shown: {names}"):
            r.failed += 1
    leaks = scan_for_secrets(seen, secrets)
    r.expect(not leaks, f"secrets in responses: {leaks[:5]}")
    # The one sanctioned exception: the create call's own answer carries the new key once.
    r.expect(kept and created.status_code == 201, "a key was created")
    return r.finish()


def scan_for_secrets(responses: list[httpx.Response], secrets: dict[str, str]) -> list[str]:
    """Where a secret appears in a response's headers or body. The answer to the call that
    created a key carries that key once, by design: it is skipped."""
    leaks = []
    for resp in responses:
        if resp.request.method == "POST" and resp.request.url.path == "/v1/cluster/keys" and resp.status_code == 201:
            continue
        text = resp.text + "\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        for what, secret in secrets.items():
            if secret and secret in text:
                leaks.append(f"{what} in {resp.request.method} {resp.request.url.path} ({resp.status_code})")
    return leaks


@scenario("poison deployment", fast=True)
async def poison_deployment(procs: Procs, tmp: Path) -> Result:
    """A deployment the reconciler cannot act on (written straight into the store, as an older
    version let in; the API now refuses it): every other deployment is still placed."""
    from modelfleet.models import Deployment
    from modelfleet.store import open_store

    r = Result(
        "poison deployment",
        "API: a 200-character name; store: the same, injected",
        detect="the poison deployment carries its reason",
        recover="a good deployment placed meanwhile",
    )
    cluster = Cluster(procs, tmp)
    ctl = cluster.controller()
    deps = f"{ctl}/v1/cluster/deployments"
    bad = {"name": "p" * 200, "backend": "openai", "source": "http://127.0.0.1:9"}
    refused = await post(deps, json=bad, headers=admin_h())
    r.sent += 1
    r.expect(
        refused.status_code in (400, 422) and refused.json()["error"]["param"] == "name",
        f"the API refuses a 200-character name: {refused.status_code}",
    )
    worker = FakeWorker([ctl]).start()
    try:
        store = open_store(cluster.store)
        try:
            await store.put_deployment(Deployment(**bad))
        finally:
            await store.close()
        t0 = time.monotonic()
        good = await post(
            deps,
            headers=admin_h(),
            json={"name": "good", "backend": "openai", "source": "http://127.0.0.1:9", "replicas": 2},
        )
        r.sent += 1
        r.expect(good.status_code == 201, f"a good deployment accepted: {good.status_code}")

        def placed() -> bool:
            data = httpx.get(f"{ctl}/v1/cluster/instances", params={"model": "good"}, headers=admin_h()).json()
            return len(data["data"]) == 2

        def reason() -> str | None:
            listed = httpx.get(deps, headers=admin_h(), timeout=5).json()["data"]
            return next((d["error"] for d in listed if d["name"] == bad["name"]), None)

        r.recover_s = await timed(placed, t0, 20, "the good deployment placed")
        r.detect_s = await timed(reason, t0, 20, "the poison deployment's reason")
        r.expect("128" in (reason() or ""), f"the reason names the limit: {reason()!r}")
        r.expect(ready(ctl), "the controller stays ready")
        r.expect("singleton loop" not in cluster.controllers[0][0].log_tail(400), "no loop restarts")
    finally:
        worker.stop()
    return r.finish()


@scenario("stalled reader", fast=True)
async def stalled_reader(procs: Procs, tmp: Path) -> Result:
    """As many streams as the model has slots, none read: the others are served once the send
    timeout (2 s here; 30 s by default) cuts them."""
    from tests.gateway.test_gw_client_timeouts import closed_within, connect, request_bytes

    r = Result(
        "stalled reader",
        "",
        detect="the gateway cut the stalled streams",
        recover="the other clients' requests all served",
    )
    cluster = Cluster(procs, tmp)
    cluster.controller()
    url = cluster.upstream("a", "--tokens", "100000", "--pad", "8192")
    cluster.start_worker().declare("w1/a", "m", url, max_concurrency=2)
    cluster.gateway("--send-timeout-s", "2", "--queue-len", "16", "--queue-wait-s", "30")
    cluster.wait_routable("m", 1)
    stalled = []
    try:
        for _ in range(2):
            s = connect(cluster.gateway_url, rcvbuf=4096)
            s.sendall(request_bytes({"model": "m", "messages": [{"role": "user", "content": "talk"}], "stream": True}))
            stalled.append(s)
        await until(lambda: cluster.status()["models"][0]["in_flight"] == 2, 10, "both slots taken")
        t0 = time.monotonic()
        body = chat_body(max_tokens=2)
        others = asyncio.create_task(run_load(f"{cluster.gateway_url}/v1/chat/completions", 40, 4, body))
        r.load = "2 stalled streams (all slots), then 40 requests from 4 other clients"
        r.detect_s = await timed(
            lambda: cluster.upstream_stats("a")["disconnects"] >= 2, t0, 30, "the stalled streams cut"
        )
        result = await others
        r.recover_s = round(time.monotonic() - t0, 2)
        tally(r, result, minimum=40)
        for s in stalled:
            r.expect(closed_within(s, 10) is not None, "the gateway closed a stalled connection")
    finally:
        for s in stalled:
            with contextlib.suppress(OSError):
                s.close()
        if cluster.worker is not None:
            cluster.worker.stop()
    return r.finish()


# -- running and reporting --------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    """A Markdown table of the rows."""

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    lines = [
        "| scenario | load | sent | failed | time to detect | time to recover | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.load} | {r.sent} | {r.failed} | {secs(r.detect_s)} | "
            f"{secs(r.recover_s)} | {'pass' if r.ok else '**FAIL**'} |"
        )
    return "\n".join(lines)


def run_many(names: list[str], base: Path) -> list[Result]:
    results = []
    for name in names:
        t0 = time.monotonic()
        res = asyncio.run(run_scenario(name, base))
        print(
            f"{res.verdict:4} {name} ({time.monotonic() - t0:.0f} s)" + (f": {res.checks}" if res.checks else ""),
            flush=True,
        )
        results.append(res)
    return results


__all__ = ["SCENARIOS", "Result", "fast_scenarios", "run_many", "run_scenario", "table"]
