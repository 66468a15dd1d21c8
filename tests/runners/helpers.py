"""Helpers for the runner tests: the scripted test backend, waiting on statuses, ports.

Importing this module registers the scripted backend (conftest.py imports it)."""

from __future__ import annotations

import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from modelfleet.models import InstanceSpec, InstanceStatus
from modelfleet.worker.runners import Launch, register_backend
from modelfleet.worker.supervisor import Supervisor

SCRIPTED = Path(__file__).resolve().parent.parent / "fakes" / "scripted_runner.py"


def scripted_launch(spec: InstanceSpec, host: str, port: int) -> Launch:
    """Backend ``scripted``: tests/fakes/scripted_runner.py, behaviour from spec.params."""
    p = spec.params
    argv = [sys.executable, str(SCRIPTED), "--host", host, "--port", str(port), "--name", spec.model,
            "--mode", str(p.get("mode", "ok")), "--seconds", str(p.get("seconds", 1.0)),
            "--code", str(p.get("code", 3))]
    if p.get("ignore_term"):
        argv.append("--ignore-term")
    if p.get("child"):
        argv.append("--child")
    return Launch(argv=argv, ready_path="/v1/models", live_path="/health", memory=int(p.get("memory", 0)),
                  gpu_memory=int(p.get("gpu_memory", 0)), gpus=list(p.get("gpus", [])))


register_backend("scripted", scripted_launch)


def port_start() -> int:
    """A random start below the ephemeral range (32768+, where client sockets live), so that
    parallel test runs on this shared machine rarely meet."""
    return random.randrange(20000, 32000, 10)


def port_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def status_of(sup: Supervisor, iid: str) -> InstanceStatus | None:
    return next((s for s in sup.statuses() if s.id == iid), None)


async def wait_for(sup: Supervisor, iid: str, pred: Callable[[InstanceStatus], bool], within: float = 60.0,
                   what: str = "") -> InstanceStatus:
    """Wait until the instance's status satisfies ``pred``; fail with the last status otherwise."""
    deadline = time.monotonic() + within
    while True:
        gen = sup.generation
        st = status_of(sup, iid)
        if st is not None and pred(st):
            return st
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"instance {iid}: {what or 'condition'} not reached in {within} s; status {st}; "
                                 f"log tail: {sup.logs(iid, 15)}")
        await sup.wait_changed(gen, min(left, 0.5))


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)
