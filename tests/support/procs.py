"""Real subprocesses for tests: start a modelfleet role, wait until it answers, kill it.

Each process logs to a file under the test's tmp dir; on failure the log tail is in the
assertion message, so a red test says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODELFLEET = [sys.executable, "-m", "modelfleet.cli"]


class Proc:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 ready_url: str | None = None, netns: str | None = None) -> None:
        self.name, self.args, self.ready_url = name, args, ready_url
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.netns = netns
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        cmd = self.args if self.netns is None else ["ip", "netns", "exec", self.netns, *self.args]
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                      start_new_session=True)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_ready(self, timeout: float = 30.0, url: str | None = None) -> Proc:
        url = url or self.ready_url
        assert url, "no ready url"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen and self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready at {url} after {timeout}s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process only (kill -9 of one role), not its group."""
        if self.popen and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                try:
                    self.popen.wait(15)
                except subprocess.TimeoutExpired:
                    pass

    def stop(self) -> None:
        """Clean stop (SIGTERM), then SIGKILL of the whole session group so no child is left."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()


class Procs:
    """Start many, stop all at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Proc] = []

    def start(self, name: str, args: list[str], **kwargs) -> Proc:
        p = Proc(name, args, self.log_dir, **kwargs).start()
        self.all.append(p)
        return p

    def controller(self, name: str, port: int, store: str, *extra: str, env: dict[str, str] | None = None,
                   wait: bool = True, netns: str | None = None, host: str = "127.0.0.1") -> Proc:
        p = self.start(name, [*MODELFLEET, "controller", "--store", store, "--host", host, "--port", str(port),
                              *extra], env=env, ready_url=f"http://{host}:{port}/health/ready", netns=netns)
        return p.wait_ready(60) if wait else p

    def worker(self, name: str, port: int, controllers: str, *extra: str, env: dict[str, str] | None = None,
               netns: str | None = None, host: str = "127.0.0.1", address: str = "127.0.0.1") -> Proc:
        return self.start(name, [*MODELFLEET, "worker", "--controller", controllers, "--name", name,
                                 "--host", host, "--address", address, "--port", str(port), *extra],
                          env=env, ready_url=f"http://{address}:{port}/health/ready", netns=netns)

    def gateway(self, name: str, port: int, controllers: str, snapshot: Path, *extra: str,
                env: dict[str, str] | None = None, host: str = "127.0.0.1") -> Proc:
        """A gateway, waited for until it answers /health/live."""
        return self.start(name, [*MODELFLEET, "gateway", "--controller", controllers, "--host", host, "--port",
                                 str(port), "--snapshot-path", str(snapshot), *extra],
                          env=env, ready_url=f"http://{host}:{port}/health/live").wait_ready(60)

    def stop_all(self) -> None:
        for p in reversed(self.all):
            p.stop()


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
