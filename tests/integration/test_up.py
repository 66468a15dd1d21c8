"""`modelfleet up` end to end: the bundled models through the official openai client, then
Ctrl-C (SIGINT) leaves no process; a second `up` finds its deployments in the store."""

from __future__ import annotations

import json
import os
import re
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
from tests.support.procs import wait_for

pytestmark = pytest.mark.timeout(600)

CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
URL = r"http://127\.0\.0\.1:\d+"
SECONDS = r"\d+\.\d s"
# Every line `up` may print (text format), whole: a line broken inside a URL or a path, an
# httpx line or any other chatter fails the test.
UP_LINES = [
    r"modelfleet up: home /\S+",
    rf"controller ready at {URL} \(store sqlite:////\S+/state\.db\) in {SECONDS}",
    rf"worker 'local' registered in {SECONDS}",
    rf"gateway ready at {URL} in {SECONDS}",
    rf"deployment ({CHAT}|{EMB}): (created \((llama\.cpp|sentence-transformers)\)|found in the store)",
    rf"model ({CHAT}|{EMB}): (pending|downloading \(.+\)|loading \((llama\.cpp|sentence-transformers) on worker "
    rf"local\)|ready in {SECONDS})",
    "", "modelfleet is up\\.", rf"  OpenAI endpoint: {URL}/v1", rf"  web console:     {URL}/",
    r"  logs:            /\S+",
    "  try:", rf"    curl {URL}/v1/chat/completions .+", rf"  or: modelfleet chat {CHAT}", "Ctrl-C stops everything\\.",
    rf"READY {URL}", "stopping…", "stopped; no process left behind",
]
# The state changes that must be there, in this order for each model.
UP_STATES = [
    rf"controller ready at {URL} ", "worker 'local' registered", rf"gateway ready at {URL} in",
    rf"deployment {CHAT}: created \(llama\.cpp\)", rf"deployment {EMB}: created \(sentence-transformers\)",
]


def check_up_output(lines: list[str]) -> None:
    """Line by line: nothing from httpx (or any library), nothing broken, every state change."""
    for line in lines:
        assert "httpx" not in line and "HTTP Request" not in line, line
        assert any(re.fullmatch(p, line) for p in UP_LINES), f"unexpected line from `modelfleet up`: {line!r}"
    for p in UP_STATES:
        assert any(re.match(p, line) for line in lines), f"no line {p!r} in:\n" + "\n".join(lines)
    for model, backend in ((CHAT, "llama\\.cpp"), (EMB, "sentence-transformers")):
        loading = [i for i, line in enumerate(lines) if re.fullmatch(rf"model {model}: loading \({backend}.*", line)]
        ready = [i for i, line in enumerate(lines) if re.fullmatch(rf"model {model}: ready in {SECONDS}", line)]
        assert len(loading) == 1 and len(ready) == 1 and loading[0] < ready[0], (model, lines)


def runner_lines(controller: str, model: str, request_id: str) -> list[str]:
    """`modelfleet instances --logs ID --request RID`: the runner's lines about that request."""
    inst = next(i["id"] for i in httpx.get(f"{controller}/v1/cluster/instances", timeout=10).json()["data"]
                if i["model"] == model)
    out: list[str] = []

    def found() -> bool:
        r = subprocess.run([sys.executable, "-m", "modelfleet.cli", "instances", "--controller", controller,
                            "--logs", inst, "--request", request_id], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        out[:] = r.stdout.splitlines()
        return bool(out)

    wait_for(found, 20, interval=0.5, what=f"the runner log line of {request_id}")
    return out


def new_lines(path: Path, offset: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(offset)
        return [line for line in f.read().decode().splitlines() if line.strip()]


class Up:
    def __init__(self, home: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.ports = {k: free_port() for k in ("gateway", "controller", "worker")}
        self.runner_start = free_port()
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.cli", "up", "--home", str(home),
             "--gateway-port", str(self.ports["gateway"]), "--controller-port", str(self.ports["controller"]),
             "--worker-port", str(self.ports["worker"]), "--runner-port-start", str(self.runner_start), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}, **(env or {})},
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

    # 40 columns: a console that wrapped at the terminal's width would break the store line.
    up = Up(tmp_path / "home", env={"COLUMNS": "40"})
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

        # Request ids: the client's comes back (answers and errors alike) and reaches the
        # runners, whose logs `instances --logs ID --request RID` filters; no access log in `up`.
        controller = f"http://127.0.0.1:{up.ports['controller']}"
        r = httpx.post(f"{gateway}/v1/chat/completions", headers={"X-Request-ID": "up-chat-1"}, timeout=60,
                       json={"model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.headers["x-request-id"] == "up-chat-1"
        r = httpx.post(f"{gateway}/v1/embeddings", headers={"X-Request-ID": "up-emb-1"}, timeout=60,
                       json={"model": EMB, "input": "a cat"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "up-emb-1"
        r = httpx.post(f"{gateway}/v1/embeddings", headers={"X-Request-ID": "up-404"}, timeout=60,
                       json={"model": "nope", "input": "a cat"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "up-404"
        # Our sentence-transformers server logs the id; the chat model runs llama.cpp's own
        # llama-server, which logs no request ids (docs/operations.md: the access log has them).
        lines = runner_lines(controller, EMB, "up-emb-1")
        assert len(lines) == 1 and re.search(r" modelfleet\.runner\.requests: request up-emb-1: POST /v1/embeddings "
                                             r"-> 200 in \d+\.\d ms$", lines[0]), lines
        assert "up-chat-1" not in (home / "logs" / "gateway.log").read_text()
        # A malformed id to filter by is refused, in the API's error format.
        some = httpx.get(f"{controller}/v1/cluster/instances", timeout=10).json()["data"][0]["id"]
        bad = httpx.get(f"{controller}/v1/cluster/instances/{some}/logs", params={"request": "a b"}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "request", bad.text

        pids = [p.pid for p in tree]
        assert up.interrupt() == 0, up.output[-3000:]
        time.sleep(0.5)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"processes left after Ctrl-C: {left}"
        assert "no process left behind" in up.output
        check_up_output(up.lines)
    finally:
        if up.popen.poll() is None:
            up.popen.kill()

    # A second `up` on the same home finds its deployments again; this one logs JSON (every
    # role: one object per line) with the gateway's access log on.
    logs = tmp_path / "home" / "logs"
    offsets = {n: (logs / n).stat().st_size for n in ("controller.log", "worker.log", "gateway.log")}
    again = Up(tmp_path / "home", "--log-format", "json", "--access-log")
    try:
        gateway = again.wait_ready()
        assert "deployment smollm2-135m-instruct: found in the store" in again.output
        assert "deployment all-minilm-l6-v2: found in the store" in again.output
        said = [json.loads(line) for line in again.lines if not line.startswith("READY ")]
        assert {o["role"] for o in said} == {"up"}
        assert [o["message"] for o in said if o.get("model") == CHAT][-1].startswith(f"model {CHAT}: ready in ")
        assert said[-1]["message"] == "modelfleet is up" and said[-1]["endpoint"] == f"{gateway}/v1"

        r = httpx.post(f"{gateway}/v1/chat/completions", headers={"X-Request-ID": "up-json-1"}, timeout=60,
                       json={"model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.headers["x-request-id"] == "up-json-1"
        controller = f"http://127.0.0.1:{again.ports['controller']}"
        e = httpx.post(f"{gateway}/v1/embeddings", headers={"X-Request-ID": "up-json-emb"}, timeout=60,
                       json={"model": EMB, "input": "a cat"})
        assert e.status_code == 200 and e.headers["x-request-id"] == "up-json-emb"
        runner = json.loads(runner_lines(controller, EMB, "up-json-emb")[-1])  # the runner logs JSON too
        assert (runner["role"], runner["request_id"], runner["status"], runner["path"]) == \
            ("runner", "up-json-emb", 200, "/v1/embeddings")

        def access() -> list[dict]:
            return [o for o in map(json.loads, new_lines(logs / "gateway.log", offsets["gateway.log"]))
                    if o.get("request_id") == "up-json-1"]

        wait_for(access, 10, what="the access log line")
        line = access()[0]
        assert (line["component"], line["model"], line["instance"], line["status"], line["attempts"]) == \
            ("modelfleet.gateway.access", CHAT, r.headers["x-modelfleet-instance"], 200, 1)
        assert line["duration_ms"] >= line["ttfb_ms"] > 0 and line["completion_tokens"] == 4
        for name, role in (("controller.log", "controller"), ("worker.log", "worker"), ("gateway.log", "gateway")):
            objs = [json.loads(x) for x in new_lines(logs / name, offsets[name])]  # each line is JSON
            assert objs and {o["role"] for o in objs} == {role}, name
            assert all({"time", "level", "component", "message"} <= set(o) for o in objs)
        assert again.interrupt() == 0
    finally:
        if again.popen.poll() is None:
            again.popen.kill()
