"""Supervisor rules, on the scripted runner (tests/fakes/scripted_runner.py) unless a real
backend is the point: readiness budget, crash and backoff, hangs, stop, orphans, ports,
drain, spec changes, and the failures that must end as a failed instance."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from modelfleet.models import InstanceSpec, InstanceState
from modelfleet.worker.runners import Launch, LaunchError, register_backend
from modelfleet.worker.runners.backend_vllm import MISSING as VLLM_MISSING
from modelfleet.worker.supervisor import Supervisor, sanitize_id
from tests.runners.helpers import alive, port_start, scripted_launch, status_of, wait_for, wait_gone

pytestmark = pytest.mark.timeout(60)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def scripted(name: str = "s", **params: object) -> InstanceSpec:
    return InstanceSpec(id=f"w1/{name}", model=name, backend="scripted", source="-", params=params)


@pytest.fixture
async def sup(tmp_path: Path):
    s = Supervisor(log_dir=tmp_path / "logs", port_start=port_start(), startup_timeout=10, backoff_initial=0.1,
                   backoff_max=2.0, stop_grace=1.0, health_interval=0.2, health_failures=2, probe_timeout=0.5)
    yield s
    await s.stop_all()


async def test_ready_status_fields_and_log(sup: Supervisor) -> None:
    spec = scripted("a", memory=123).model_copy(update={"max_concurrency": 7})
    g0 = sup.generation
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 20, "ready")
    assert sup.generation > g0
    port = sup.describe(spec.id)["port"]
    assert st.endpoint == f"http://127.0.0.1:{port}"
    assert (st.model, st.backend, st.source, st.max_concurrency) == ("a", "scripted", "-", 7)
    assert alive(st.pid) and st.restarts == 0 and st.last_error is None
    assert any("scripted runner pid" in line for line in sup.logs(spec.id))
    assert (sup.log_dir / f"{sanitize_id(spec.id)}.log").exists()
    assert sup.held_resources()["memory"] == 123
    # Applying the same set again changes nothing.
    g1 = sup.generation
    await sup.apply([spec])
    await asyncio.sleep(0.5)
    assert status_of(sup, spec.id).pid == st.pid  # type: ignore[union-attr]
    assert sup.generation == g1  # nothing moved: the agent has nothing new to send


async def test_runner_env_has_no_cluster_secrets(sup: Supervisor, monkeypatch) -> None:
    monkeypatch.setenv("MODELFLEET_JOIN_TOKEN", "s3cret")
    monkeypatch.setenv("MODELFLEET_CONTROLLER", "http://c:8100")
    spec = scripted("env")
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 20, "ready")
    env = psutil.Process(st.pid).environ()
    assert "MODELFLEET_JOIN_TOKEN" not in env
    assert env["MODELFLEET_CONTROLLER"] == "http://c:8100"


async def test_crash_loop_backoff_doubles(sup: Supervisor) -> None:
    spec = scripted("crashy", mode="exit", code=3)
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.restarts >= 4, 20, "4 restarts")
    delays = sup.describe(spec.id)["restart_delays"]
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.FAILED, 10, "failed")
    assert "runner exited with code 3" in st.last_error
    assert "failing on purpose with code 3" in st.last_error  # the log's last lines come along


async def test_backoff_caps_at_max(tmp_path: Path) -> None:
    s = Supervisor(log_dir=tmp_path, port_start=port_start(), backoff_initial=0.05, backoff_max=0.2)
    try:
        spec = scripted("capped", mode="exit")
        await s.apply([spec])
        await wait_for(s, spec.id, lambda st: st.restarts >= 5, 20, "5 restarts")
        assert s.describe(spec.id)["restart_delays"][:5] == pytest.approx([0.05, 0.1, 0.2, 0.2, 0.2])
    finally:
        await s.stop_all()


async def test_runner_that_crashes_after_ready_is_restarted(sup: Supervisor) -> None:
    spec = scripted("flaky", mode="crash-after", seconds=0.5, code=5)
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.restarts >= 1 and s.state == InstanceState.READY, 20,
                        "ready again after a crash")
    assert "runner exited with code 5" in st.last_error


async def test_never_ready_runner_is_killed_and_fails(tmp_path: Path) -> None:
    s = Supervisor(log_dir=tmp_path, port_start=port_start(), startup_timeout=1.5, backoff_initial=30)
    try:
        spec = scripted("slow", mode="never-ready")
        await s.apply([spec])
        st = await wait_for(s, spec.id, lambda x: x.state == InstanceState.STARTING and x.pid is not None, 10)
        pid = st.pid
        st = await wait_for(s, spec.id, lambda x: x.state == InstanceState.FAILED, 10, "failed")
        assert st.last_error.startswith("not ready after 1.5 s")
        assert "loading forever" in st.last_error
        assert st.pid is None and wait_gone(pid, 5)
    finally:
        await s.stop_all()


async def test_hung_runner_is_restarted(sup: Supervisor) -> None:
    spec = scripted("hangs", mode="hang-after", seconds=0.5)
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.restarts >= 1, 20, "restart after hang")
    assert "stopped answering" in st.last_error


async def test_missing_model_path_fails_naming_it(sup: Supervisor) -> None:
    spec = InstanceSpec(id="w1/m", model="m", backend="llama.cpp", source="/nonexistent/dir/model.gguf")
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.FAILED, 10, "failed")
    assert st.last_error == "model path does not exist: /nonexistent/dir/model.gguf"
    assert st.restarts == 0 and st.pid is None
    await asyncio.sleep(0.3)
    assert status_of(sup, spec.id).restarts == 0  # type: ignore[union-attr]  # no retry of a config error


async def test_unknown_backend_fails(sup: Supervisor) -> None:
    spec = InstanceSpec(id="w1/u", model="u", backend="tensorflow-serving", source="x")
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.FAILED, 10, "failed")
    assert st.last_error.startswith("unknown backend 'tensorflow-serving' (known: ")


async def test_vllm_missing_fails_with_exact_message(sup: Supervisor) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    spec = InstanceSpec(id="w1/v", model="v", backend="vllm", source="meta-llama/Llama-3.2-1B-Instruct")
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.FAILED, 10, "failed")
    assert st.last_error == "backend vllm needs the vllm extra (pip install 'modelfleet[vllm]')" == VLLM_MISSING


async def test_bad_params_fail_clearly(sup: Supervisor) -> None:
    spec = InstanceSpec(id="w1/p", model="smollm2-135m-instruct", backend="llama-cpp-python",
                        source="smollm2-135m-instruct", params={"n_parallel": 4})
    bogus = InstanceSpec(id="w1/q", model="smollm2-135m-instruct", backend="llama.cpp",
                         source="smollm2-135m-instruct", params={"no_such_flag": 1})
    await sup.apply([spec, bogus])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.FAILED, 10, "failed")
    assert "serves one request at a time" in st.last_error
    st = await wait_for(sup, bogus.id, lambda s: s.state == InstanceState.FAILED, 10, "failed")
    assert "unknown parameter(s) no_such_flag" in st.last_error


async def test_port_in_use_is_skipped(tmp_path: Path) -> None:
    start = port_start()
    while not all(port_free(p) for p in (start, start + 1, start + 2)):
        start = port_start()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", start))
        taken.listen()
        s = Supervisor(log_dir=tmp_path, port_start=start)
        try:
            spec = scripted("p")
            await s.apply([spec])
            st = await wait_for(s, spec.id, lambda x: x.state == InstanceState.READY, 20, "ready")
            assert st.endpoint == f"http://127.0.0.1:{start + 1}"
            # Two instances never share a port.
            other = scripted("q")
            await s.apply([spec, other])
            st2 = await wait_for(s, other.id, lambda x: x.state == InstanceState.READY, 20, "ready")
            assert st2.endpoint == f"http://127.0.0.1:{start + 2}"
        finally:
            await s.stop_all()


async def test_port_taken_after_start_moves_to_a_free_port(sup: Supervisor) -> None:
    """A port grabbed by someone else while the runner is down: the restart picks another."""
    spec = scripted("mv")
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda x: x.state == InstanceState.READY, 20, "ready")
    port = sup.describe(spec.id)["port"]
    os.kill(st.pid, signal.SIGKILL)
    await wait_for(sup, spec.id, lambda x: x.state == InstanceState.FAILED, 10, "failed")
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        st = await wait_for(sup, spec.id, lambda x: x.state == InstanceState.READY and x.restarts == 1, 20,
                            "ready on another port")
        assert st.endpoint != f"http://127.0.0.1:{port}"


async def test_stop_leaves_no_process(sup: Supervisor) -> None:
    spec = scripted("stubborn", ignore_term=True, child=True)
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 20, "ready")
    children = psutil.Process(st.pid).children(recursive=True)
    assert children, "the scripted runner should have started a child"
    t0 = time.monotonic()
    await sup.apply([])
    st2 = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.STOPPED, 10, "stopped")
    assert time.monotonic() - t0 >= 0.9  # it ignored SIGTERM: SIGKILL came after stop_grace
    assert st2.pid is None
    assert not alive(st.pid)
    assert all(wait_gone(c.pid, 3) for c in children)
    assert sup.held_resources()["memory"] == 0
    # Reported once as stopped, then forgotten at the next apply.
    await sup.apply([])
    assert status_of(sup, spec.id) is None


async def test_stop_all_stops_everything(tmp_path: Path) -> None:
    s = Supervisor(log_dir=tmp_path, port_start=port_start())
    specs = [scripted("x"), scripted("y")]
    await s.apply(specs)
    pids = [(await wait_for(s, sp.id, lambda st: st.state == InstanceState.READY, 20)).pid for sp in specs]
    await s.stop_all()
    assert all(st.state == InstanceState.STOPPED for st in s.statuses())
    assert not any(alive(p) for p in pids)


async def test_drain_is_sticky_and_spec_disable_drains(sup: Supervisor) -> None:
    a, b = scripted("da"), scripted("db")
    await sup.apply([a, b])
    for sp in (a, b):
        await wait_for(sup, sp.id, lambda s: s.state == InstanceState.READY, 20, "ready")
    await sup.drain(a.id)
    assert status_of(sup, a.id).state == InstanceState.DRAINING  # type: ignore[union-attr]
    await sup.apply([a, b.model_copy(update={"enabled": False})])
    assert status_of(sup, a.id).state == InstanceState.DRAINING  # type: ignore[union-attr]
    assert status_of(sup, b.id).state == InstanceState.DRAINING  # type: ignore[union-attr]
    await sup.apply([a, b])
    assert status_of(sup, b.id).state == InstanceState.READY  # type: ignore[union-attr]
    await sup.drain("w1/nope")  # unknown: no error


async def test_spec_change_restarts_runner(sup: Supervisor) -> None:
    spec = scripted("c", seconds=1.0)
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 20, "ready")
    changed = scripted("c", seconds=2.0)
    await sup.apply([changed])
    st2 = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY and s.pid != st.pid, 20,
                         "ready with a new runner")
    assert not alive(st.pid)
    assert "--seconds 2.0" in " ".join(sup.describe(spec.id)["argv"])
    assert st2.restarts == 0
    # max_concurrency alone changes in place.
    await sup.apply([changed.model_copy(update={"max_concurrency": 9})])
    st3 = status_of(sup, spec.id)
    assert st3.pid == st2.pid and st3.max_concurrency == 9  # type: ignore[union-attr]


async def test_readded_while_stopping_starts_again(sup: Supervisor) -> None:
    spec = scripted("r", ignore_term=True)
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 20, "ready")
    await sup.apply([])
    await sup.apply([spec])  # wanted again before the first stop finished
    st2 = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY and s.pid != st.pid, 20,
                         "ready again")
    assert not alive(st.pid) and alive(st2.pid)


ORPHAN_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    sys.path.insert(0, {repo_dir!r})
    import tests.runners.helpers  # registers the scripted backend
    from modelfleet.models import InstanceSpec
    from modelfleet.bundled import BUNDLED
    from modelfleet.worker.supervisor import Supervisor

    async def main():
        sup = Supervisor(log_dir=Path({log_dir!r}), port_start={port})
        specs = [InstanceSpec(id="o/s", model="s", backend="scripted", source="-"),
                 InstanceSpec(id="o/llama", model="smollm2-135m-instruct", backend="llama.cpp",
                              source="smollm2-135m-instruct", params={{"n_ctx": 256, "n_threads": 1}})]
        await sup.apply(specs)
        while True:
            sts = sup.statuses()
            if all(s.state == "ready" for s in sts):
                print(json.dumps([s.pid for s in sts]), flush=True)
                break
            if any(s.state == "failed" for s in sts):
                print(json.dumps({{"failed": [s.last_error for s in sts]}}), flush=True)
                return
            await asyncio.sleep(0.1)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


@pytest.mark.slow
def test_kill_9_of_the_owner_leaves_no_runner(tmp_path: Path) -> None:
    """kill -9 of the process that owns a Supervisor: its runners die with it (PR_SET_PDEATHSIG)."""
    repo_dir = str(Path(__file__).resolve().parents[2])
    script = ORPHAN_SCRIPT.format(repo_dir=repo_dir, log_dir=str(tmp_path), port=port_start())
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()  # type: ignore[union-attr]
        pids = json.loads(line)
        assert isinstance(pids, list), pids
        assert all(alive(p) for p in pids)
        for p in pids:  # the runners are the owner's children, in their own sessions
            assert psutil.Process(p).ppid() == owner.pid
            assert os.getsid(p) == p
        owner.kill()  # SIGKILL: no cleanup code runs in the owner
        owner.wait(5)
        assert all(wait_gone(p, 5) for p in pids), [p for p in pids if alive(p)]
    finally:
        if owner.poll() is None:
            owner.kill()


async def test_config_error_heals_when_the_world_does(tmp_path: Path) -> None:
    """A config error starts nothing, but is checked again every backoff_max seconds: a model
    file that appears later (a late mount) gets the instance going without a redeploy."""
    marker = tmp_path / "model.bin"

    def needs_file(spec: InstanceSpec, host: str, port: int) -> Launch:
        if not marker.exists():
            raise LaunchError(f"model path does not exist: {marker}")
        return scripted_launch(spec, host, port)

    register_backend("needs-file", needs_file)
    s = Supervisor(log_dir=tmp_path / "logs", port_start=port_start(), backoff_max=0.3)
    try:
        spec = InstanceSpec(id="w1/late", model="late", backend="needs-file", source=str(marker))
        await s.apply([spec])
        st = await wait_for(s, spec.id, lambda x: x.state == InstanceState.FAILED, 10, "failed")
        assert st.last_error == f"model path does not exist: {marker}" and st.pid is None
        g = s.generation
        await asyncio.sleep(1.0)
        assert s.generation == g  # re-checks that fail the same way report nothing new
        marker.touch()
        st = await wait_for(s, spec.id, lambda x: x.state == InstanceState.READY, 10, "ready")
        assert st.restarts == 0
    finally:
        await s.stop_all()
