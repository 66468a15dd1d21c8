"""`modelfleet up`: a controller (SQLite under $MODELFLEET_HOME), one worker, a gateway and the
bundled models, on this machine, from one command. Ctrl-C stops everything.

Each role is its own process (as in production), started in its own session so that the
terminal's Ctrl-C reaches only this supervisor, which then stops them in order: gateway,
worker (which stops its runners), controller. Each child also dies with this process
(parent-death signal) if it is killed outright."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from modelfleet.bundled import BUNDLED
from modelfleet.config import modelfleet_home, private_dir
from modelfleet.logs import FORMAT_ENV
from modelfleet.procutil import with_parent_death_signal

# soft_wrap: a line is never broken at the terminal's width (a URL or a store path stays
# whole, can be copied and grepped); the terminal wraps it for display if it must.
console = Console(stderr=True, soft_wrap=True, highlight=False)
log = logging.getLogger("modelfleet.up")


def say(text: str, style: str | None = None, **fields: object) -> None:
    """One line per state change: plain text, or a JSON log line with ``fields`` under
    ``--log-format json`` (logs.py), so that a machine reads `up` like any other role."""
    if os.environ.get(FORMAT_ENV) == "json":
        log.log(logging.WARNING if style == "red" else logging.INFO, text, extra=fields)
    else:
        console.print(text, style=style, markup=False)


@dataclass
class UpSettings:
    home: str | None = None
    gateway_port: int = 8000
    controller_port: int = 8100
    worker_port: int = 8200
    runner_port_start: int = 30000
    deploy_bundled: bool = True
    ready_timeout: float = 600.0
    access_log: bool = False


def curl_line(gateway: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
    return f"curl {gateway}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


class Role:
    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.log_path = name, log_path
        log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            with_parent_death_signal([sys.executable, "-m", "modelfleet.cli", *args]), stdout=log,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in its session (runners of a worker that did not stop them)
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()


def wait_http(url: str, role: Role, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not role.alive():
            raise RuntimeError(f"{role.name} exited ({role.popen.returncode}); see {role.log_path}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{role.name} not ready at {url} after {timeout:.0f} s; see {role.log_path}")


def ensure_bundled_deployments(controller: str) -> list[str]:
    """Deploy the bundled models unless the store already has them (a second `up` finds them)."""
    existing = {d["name"] for d in httpx.get(f"{controller}/v1/cluster/deployments", timeout=10).json()["data"]}
    for m in BUNDLED.values():
        if m.name in existing:
            say(f"deployment {m.name}: found in the store", model=m.name)
            continue
        r = httpx.post(f"{controller}/v1/cluster/deployments", timeout=10, json={
            "name": m.name, "backend": m.backend, "source": m.name, "replicas": 1,
            # The chat model runs on llama-server with one slot per concurrent request.
            "max_concurrency": 8,
        })
        r.raise_for_status()
        say(f"deployment {m.name}: created ({m.backend})", model=m.name, backend=m.backend)
    return list(BUNDLED)


# A model's state as `up` shows it: the best of its instances' states.
_RANK = {"pending": 0, "failed": 0, "stopped": 0, "draining": 0, "downloading": 1, "starting": 2, "ready": 3}
_SHOWN = {"starting": "loading"}  # what a person calls a runner that reads its model


@dataclass
class ModelWatch:
    state: str = ""
    progress_step: int = -1  # last download quarter reported
    error: str | None = None


def _download_text(d: dict[str, object]) -> str:
    done, total = d.get("done") or 0, d.get("total")
    if d.get("state") == "resolving":
        return "asking the hub"
    mib = 1024 * 1024
    if isinstance(total, int | float) and total and isinstance(done, int | float):
        return f"{100 * done / total:.0f}% of {total / mib:.1f} MiB"
    return f"{float(done) / mib:.1f} MiB" if isinstance(done, int | float) else "started"


def model_lines(names: list[str], watch: dict[str, ModelWatch], instances: list[dict[str, object]],
                elapsed_s: float) -> list[str]:
    """The lines to print for this poll of the instances: a model's state when it changes
    (pending, downloading with progress by quarters, loading, ready with the time it took),
    a failure with its reason once. Pure: `up` polls, this decides."""
    best: dict[str, dict[str, object]] = {}
    for inst in instances:
        name = str(inst.get("model"))
        if name not in names:
            continue
        cur = best.get(name)
        if cur is None or _RANK.get(str(inst.get("state")), 0) > _RANK.get(str(cur.get("state")), 0):
            best[name] = inst
    out = []
    for name in names:
        w = watch.setdefault(name, ModelWatch())
        inst = best.get(name, {"state": "pending"})
        state = str(inst.get("state"))
        if state == "failed":
            err = str(inst.get("last_error") or "no reason given").splitlines()[0]
            if err != w.error:
                out.append(f"model {name}: failed: {err}")
                w.error = err
            continue
        if state == "downloading" and isinstance(inst.get("download"), dict):
            d = inst["download"]
            assert isinstance(d, dict)
            done, total = d.get("done") or 0, d.get("total")
            step = int(4 * done / total) if total else 0
            if state != w.state or step > w.progress_step:
                out.append(f"model {name}: downloading ({_download_text(d)})")
                w.progress_step = step
                w.state = state
            continue
        if state == w.state:
            continue
        where = f" on worker {inst['worker_id']}" if inst.get("worker_id") else ""
        if state == "ready":
            if w.state != "starting":
                # It loaded between two polls (llama-server loads a small model in well under
                # one): the step happened, and an operator reads every step.
                out.append(f"model {name}: loading ({inst.get('backend')}{where})")
            out.append(f"model {name}: ready in {elapsed_s:.1f} s")
        elif state == "starting":
            out.append(f"model {name}: loading ({inst.get('backend')}{where})")
        else:
            out.append(f"model {name}: {_SHOWN.get(state, state)}")
        w.state = state
    return out


def wait_models_ready(controller: str, names: list[str], roles: list[Role], timeout: float) -> None:
    started = time.monotonic()
    deadline = started + timeout
    watch: dict[str, ModelWatch] = {}
    while time.monotonic() < deadline:
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited ({role.popen.returncode}); see {role.log_path}")
        data = httpx.get(f"{controller}/v1/cluster/instances", timeout=10).json()["data"]
        for line in model_lines(names, watch, data, time.monotonic() - started):
            say(line, "red" if ": failed: " in line else None, model=line.split(":")[0].removeprefix("model "))
        if all(watch[n].state == "ready" for n in names):
            return
        time.sleep(0.5)
    raise RuntimeError("models not ready after {:.0f} s: {}".format(
        timeout, ", ".join(f"{n} {watch[n].state or 'pending'}" for n in names)))


def print_banner(gateway: str, logs: Path, chat_model: str) -> None:
    console.print(
        f"\n[bold green]modelfleet is up.[/bold green]\n"
        f"  OpenAI endpoint: {gateway}/v1\n"
        f"  web console:     {gateway}/\n"
        f"  logs:            {logs}\n"
        f"  try:"
    )
    # One unwrapped, unstyled line, so that it can be copied and run as printed.
    console.print(f"    {curl_line(gateway, chat_model)}", markup=False)
    console.print(f"  or: modelfleet chat {chat_model}\nCtrl-C stops everything.")


def run_up(s: UpSettings) -> int:
    home = Path(s.home).expanduser() if s.home else modelfleet_home()
    logs = home / "logs"
    private_dir(home)
    private_dir(logs)
    # No HF_HUB_OFFLINE here: the bundled models download nothing and runners are always offline;
    # a model deployed later from hf:// is fetched because it was asked for (docs/models.md).
    env = {**os.environ, "MODELFLEET_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    for k in ("MODELFLEET_ADMIN_TOKEN", "MODELFLEET_JOIN_TOKEN", "MODELFLEET_ADMIN_TOKEN_FILE",
              "MODELFLEET_JOIN_TOKEN_FILE", "MODELFLEET_CONTROLLER", "MODELFLEET_PORT", "MODELFLEET_HOST",
              "MODELFLEET_STORE"):
        env.pop(k, None)  # `up` is the embedded, local, token-less cluster
    controller = f"http://127.0.0.1:{s.controller_port}"
    gateway = f"http://127.0.0.1:{s.gateway_port}"
    store = f"sqlite:///{home / 'state.db'}"
    roles: list[Role] = []
    interrupted = False

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Explicitly: started in the background without job control, SIGINT arrives ignored
    # (SIG_IGN is inherited) and Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, on_term)
    try:
        say(f"modelfleet up: home {home}", home=str(home))
        t0 = time.monotonic()
        roles.append(Role("controller", ["controller", "--store", store, "--host", "127.0.0.1",
                                         "--port", str(s.controller_port)], logs / "controller.log", env))
        wait_http(f"{controller}/health/ready", roles[-1], 60)
        say(f"controller ready at {controller} (store {store}) in {time.monotonic() - t0:.1f} s",
            url=controller, store=store)
        t0 = time.monotonic()
        roles.append(Role("worker", ["worker", "--controller", controller, "--name", "local", "--host", "127.0.0.1",
                                     "--address", "127.0.0.1", "--port", str(s.worker_port),
                                     "--runner-port-start", str(s.runner_port_start)], logs / "worker.log", env))
        wait_http(f"http://127.0.0.1:{s.worker_port}/health/ready", roles[-1], 60)
        say(f"worker 'local' registered in {time.monotonic() - t0:.1f} s", worker="local")
        t0 = time.monotonic()
        roles.append(Role("gateway", ["gateway", "--controller", controller, "--host", "127.0.0.1",
                                      "--port", str(s.gateway_port),
                                      "--access-log" if s.access_log else "--no-access-log"],
                          logs / "gateway.log", env))
        wait_http(f"{gateway}/health/live", roles[-1], 60)
        say(f"gateway ready at {gateway} in {time.monotonic() - t0:.1f} s", url=gateway)
        names = ensure_bundled_deployments(controller) if s.deploy_bundled else []
        if names:
            wait_models_ready(controller, names, roles, s.ready_timeout)
        chat_model = next((m.name for m in BUNDLED.values() if m.kind == "chat"), "MODEL")
        if os.environ.get(FORMAT_ENV) == "json":
            say("modelfleet is up", endpoint=f"{gateway}/v1", console=f"{gateway}/", logs=str(logs),
                curl=curl_line(gateway, chat_model))
        else:
            print_banner(gateway, logs, chat_model)
        print(f"READY {gateway}", flush=True)  # one stable line for scripts and tests (stdout)
        while all(r.alive() for r in roles):
            time.sleep(0.5)
        dead = [r for r in roles if not r.alive()]
        say(f"{dead[0].name} exited unexpectedly; see {dead[0].log_path}", "red", exited=dead[0].name)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        return 0
    except RuntimeError as exc:
        say(f"modelfleet up failed: {exc}", "red")
        return 1
    finally:
        if roles:
            say("stopping…" if interrupted else "stopping what was started…")
        for role in reversed(roles):
            role.stop()
        if roles:
            say("stopped; no process left behind")
