"""`modelfleet up` end to end: the bundled models through the official openai client, then
Ctrl-C (SIGINT) leaves no process; a second `up` finds its deployments in the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(600)


class Up:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.ports = {k: free_port() for k in ("gateway", "controller", "worker")}
        self.runner_start = free_port()
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.cli", "up", "--home", str(home),
             "--gateway-port", str(self.ports["gateway"]), "--controller-port", str(self.ports["controller"]),
             "--worker-port", str(self.ports["worker"]), "--runner-port-start", str(self.runner_start)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")},
        )
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("READY "):
                self.ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 300) -> str:
        if not self.ready.wait(timeout):
            raise AssertionError(f"`modelfleet up` not ready after {timeout}s:\n{self.output[-4000:]}")
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.popen.pid).children(recursive=True)

    def interrupt(self, timeout: float = 60) -> int:
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout)


def test_up_serves_bundled_models_and_ctrl_c_leaves_nothing(tmp_path):
    from openai import OpenAI

    up = Up(tmp_path / "home")
    try:
        gateway = up.wait_ready()
        out = up.output
        # State for this user only: the home, logs and the gateway snapshot's folder 0700; the
        # SQLite store (key hashes) and its WAL files, the route snapshot 0600.
        home = tmp_path / "home"
        modes = {p.relative_to(home).as_posix(): oct(p.stat().st_mode & 0o777)
                 for p in (home, home / "logs", home / "logs" / "local", home / "state.db", home / "state.db-wal",
                           home / "state.db-shm", home / "gateway-routes.json")}
        assert modes == {".": "0o700", "logs": "0o700", "logs/local": "0o700", "state.db": "0o600",
                         "state.db-wal": "0o600", "state.db-shm": "0o600", "gateway-routes.json": "0o600"}, modes
        assert f"OpenAI endpoint: {gateway}/v1" in out and f"web console:     {gateway}/" in out
        assert f"curl {gateway}/v1/chat/completions" in out
        tree = up.descendants()
        assert len(tree) >= 5, [p.cmdline() for p in tree]  # 3 roles + 2 runners

        client = OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}
        reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=16,
                                               messages=[{"role": "user", "content": "Say hello"}])
        assert reply.choices[0].message.content
        pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "Count to five"}]) if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1
        emb = client.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a dog"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384

        # A batch of 12 concurrent calls (a LangChain .batch()) on the one chat replica: its 8
        # llama-server slots take 8, the gateway queues 4; none is refused.
        def ask(i: int) -> str:
            r = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=32,
                                               messages=[{"role": "user", "content": f"Tell me about the number {i}"}])
            return r.choices[0].finish_reason

        with ThreadPoolExecutor(12) as pool:
            finishes = list(pool.map(ask, range(12)))
        assert all(f in ("stop", "length") for f in finishes), finishes
        # The worker scrapes llama-server's slots and exports them.
        worker_metrics = ""
        deadline = time.monotonic() + 30
        while "modelfleet_worker_runner_slots{" not in worker_metrics and time.monotonic() < deadline:
            time.sleep(0.5)
            worker_metrics = httpx.get(f"http://127.0.0.1:{up.ports['worker']}/metrics", timeout=10).text
        slot_lines = [line for line in worker_metrics.splitlines() if line.startswith("modelfleet_worker_runner_")]
        assert any(line.startswith("modelfleet_worker_runner_slots{") and line.endswith(" 8.0")
                   for line in slot_lines), slot_lines
        for name in ("slots_busy", "queue", "prompt_tokens_cached", "generated_tokens"):
            assert any(line.startswith(f"modelfleet_worker_runner_{name}{{") for line in slot_lines), slot_lines

        # The curl line works as printed.
        curl = next(line.strip() for line in up.lines if line.strip().startswith("curl "))
        r = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and '"choices"' in r.stdout, r.stdout + r.stderr

        pids = [p.pid for p in tree]
        assert up.interrupt() == 0, up.output[-3000:]
        time.sleep(0.5)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"processes left after Ctrl-C: {left}"
        assert "no process left behind" in up.output
    finally:
        if up.popen.poll() is None:
            up.popen.kill()

    # A second `up` on the same home finds its deployments again.
    again = Up(tmp_path / "home")
    try:
        again.wait_ready()
        assert "deployment smollm2-135m-instruct: found in the store" in again.output
        assert "deployment all-minilm-l6-v2: found in the store" in again.output
        assert again.interrupt() == 0
    finally:
        if again.popen.poll() is None:
            again.popen.kill()
