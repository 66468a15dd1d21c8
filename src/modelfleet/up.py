"""`modelfleet up`: a controller (SQLite under $MODELFLEET_HOME), one worker, a gateway and the
bundled models, on this machine, from one command. Ctrl-C stops everything.

Each role is its own process (as in production), started in its own session so that the
terminal's Ctrl-C reaches only this supervisor, which then stops them in order: gateway,
worker (which stops its runners), controller. Each child also dies with this process
(parent-death signal) if it is killed outright."""

from __future__ import annotations

import json
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
from modelfleet.procutil import with_parent_death_signal

console = Console(stderr=True)


@dataclass
class UpSettings:
    home: str | None = None
    gateway_port: int = 8000
    controller_port: int = 8100
    worker_port: int = 8200
    runner_port_start: int = 30000
    deploy_bundled: bool = True
    ready_timeout: float = 600.0


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
            console.print(f"deployment {m.name}: found in the store")
            continue
        r = httpx.post(f"{controller}/v1/cluster/deployments", timeout=10, json={
            "name": m.name, "backend": m.backend, "source": m.name, "replicas": 1,
            # The chat model runs on llama-server with one slot per concurrent request.
            "max_concurrency": 8,
        })
        r.raise_for_status()
        console.print(f"deployment {m.name}: created ({m.backend})")
    return list(BUNDLED)


def wait_models_ready(controller: str, names: list[str], roles: list[Role], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    with console.status("loading models…") as status:
        while time.monotonic() < deadline:
            for role in roles:
                if not role.alive():
                    raise RuntimeError(f"{role.name} exited ({role.popen.returncode}); see {role.log_path}")
            data = httpx.get(f"{controller}/v1/cluster/instances", timeout=10).json()["data"]
            states = {n: "pending" for n in names}
            for inst in data:
                if inst["model"] in states and states[inst["model"]] != "ready":
                    states[inst["model"]] = inst["state"]
                    if inst["state"] == "failed":
                        console.print(f"[red]{inst['model']} failed:[/red] {inst.get('last_error')}")
            for n, st in states.items():
                if last.get(n) != st:
                    console.print(f"model {n}: {st}")
            last = states
            status.update("loading models: " + ", ".join(f"{n} {s}" for n, s in states.items()))
            if all(s == "ready" for s in states.values()):
                return
            time.sleep(0.5)
    raise RuntimeError(f"models not ready after {timeout:.0f} s: {last}")


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
        console.print(f"modelfleet up: home {home}")
        roles.append(Role("controller", ["controller", "--store", store, "--host", "127.0.0.1",
                                         "--port", str(s.controller_port)], logs / "controller.log", env))
        wait_http(f"{controller}/health/ready", roles[-1], 60)
        console.print(f"controller ready at {controller} (store {store})")
        roles.append(Role("worker", ["worker", "--controller", controller, "--name", "local", "--host", "127.0.0.1",
                                     "--address", "127.0.0.1", "--port", str(s.worker_port),
                                     "--runner-port-start", str(s.runner_port_start)], logs / "worker.log", env))
        wait_http(f"http://127.0.0.1:{s.worker_port}/health/ready", roles[-1], 60)
        console.print("worker 'local' registered")
        roles.append(Role("gateway", ["gateway", "--controller", controller, "--host", "127.0.0.1",
                                      "--port", str(s.gateway_port)], logs / "gateway.log", env))
        wait_http(f"{gateway}/health/live", roles[-1], 60)
        console.print(f"gateway ready at {gateway}")
        names = ensure_bundled_deployments(controller) if s.deploy_bundled else []
        if names:
            wait_models_ready(controller, names, roles, s.ready_timeout)
        chat_model = next((m.name for m in BUNDLED.values() if m.kind == "chat"), "MODEL")
        console.print(
            f"\n[bold green]modelfleet is up.[/bold green]\n"
            f"  OpenAI endpoint: {gateway}/v1\n"
            f"  web console:     {gateway}/\n"
            f"  logs:            {logs}\n"
            f"  try:"
        )
        # One unwrapped, unstyled line, so that it can be copied and run as printed.
        console.print(f"    {curl_line(gateway, chat_model)}", soft_wrap=True, markup=False, highlight=False)
        console.print(f"  or: modelfleet chat {chat_model}\nCtrl-C stops everything.")
        print(f"READY {gateway}", flush=True)  # one stable line for scripts and tests
        while all(r.alive() for r in roles):
            time.sleep(0.5)
        dead = [r for r in roles if not r.alive()]
        console.print(f"[red]{dead[0].name} exited unexpectedly; see {dead[0].log_path}[/red]")
        return 1
    except KeyboardInterrupt:
        interrupted = True
        return 0
    except RuntimeError as exc:
        console.print(f"[red]modelfleet up failed:[/red] {exc}")
        return 1
    finally:
        if roles:
            console.print("stopping…" if interrupted else "stopping what was started…")
        for role in reversed(roles):
            role.stop()
        if roles:
            console.print("stopped; no process left behind")
