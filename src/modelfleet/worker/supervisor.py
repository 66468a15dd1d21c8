"""The Supervisor: starts, watches, restarts and stops the model runners of one worker.

The agent hands it the desired set of instances (``apply``); the Supervisor makes the
machine match, in background tasks, and reports what it observes (``statuses``,
``generation``). Rules:

- Every process runner gets a free port from ``port_start`` upward (checked by binding),
  its own session (``start_new_session``) and a parent-death signal (SIGKILL when the
  agent dies, even by ``kill -9``), and writes stdout and stderr to
  ``log_dir/<instance id, sanitized>.log``.
- States: pending -> starting -> ready; draining (still serving, no new requests from the
  gateway); failed (``last_error`` says why, with the runner log's last lines); stopped.
- Ready = the runner's ready path answers 200 within ``startup_timeout``; otherwise the
  runner is killed and the instance fails with "not ready after N s".
- A runner that exits, is killed, or stops answering its live path ``health_failures``
  times in a row is restarted after a backoff (``backoff_initial`` doubling up to
  ``backoff_max``; back to the start after a run that stayed up ``backoff_max``).
- Problems no restart can fix (unknown backend, missing package, missing model path, bad
  parameter) fail the instance at once with that message; nothing is started, and the
  check is repeated every ``backoff_max`` seconds (a late mount or an install heals it).
- A remote source (hf://, modelscope://, https://) is fetched first, through ``fetcher``
  (the worker's DownloadManager): state ``downloading`` until the files are in the cache,
  then the runner starts on the local copy. A failed download (not found, no access,
  checksum, disk full, network) fails the instance with the reason and is tried again every
  ``backoff_max`` seconds, like a config error; the partial file is resumed.
- Stop: SIGTERM to the runner's process group, SIGKILL after ``stop_grace``.
- Nothing raises out of the Supervisor's background work: every failure ends as a
  failed instance.

Parent-death signals belong to the *thread* that forked the child: the Supervisor must
run on a loop whose thread lives as long as the agent (the main thread, as in uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelfleet.config import private_dir
from modelfleet.models import InstanceSpec, InstanceState, InstanceStatus
from modelfleet.procutil import with_parent_death_signal
from modelfleet.sources import is_remote
from modelfleet.worker.runners import ATTACHED, Launch, LaunchError, prepare_launch
from modelfleet.worker.slots import Target

# spec -> local path of its remote source (raises with the reason when it cannot be had).
Fetcher = Callable[[InstanceSpec], Awaitable[str]]

log = logging.getLogger("modelfleet.worker")


LOG_ROTATE_BYTES = 20 * 1024 * 1024
ERROR_TAIL_LINES = 20
_HEADER = "=== modelfleet:"
_ACTIVE = (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING)


def runner_environ() -> dict[str, str]:
    """The worker's environment minus its own secrets: runners (third-party servers among
    them) have no business with the cluster's join or admin token."""
    secret = re.compile(r"^MODELFLEET_.*(TOKEN|KEY|SECRET|PASSWORD)", re.IGNORECASE)
    return {k: v for k, v in os.environ.items() if not secret.match(k)}


def sanitize_id(instance_id: str) -> str:
    """A file name for an instance id ("w1/smol" -> "w1_smol")."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", instance_id).strip(".") or "instance"


def _fmt_seconds(s: float) -> str:
    return f"{s:g}"


def _read_tail(path: Path, lines: int, max_bytes: int = 4 * 1024 * 1024) -> list[str]:
    """The last ``lines`` lines of a file, reading backwards from its end."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            pos, data = end, b""
            while pos > 0 and data.count(b"\n") <= lines and end - pos < max_bytes:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    # Progress bars rewrite one line with \r: keep what a terminal would show last.
    out = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
           for line in text.split("\n")]
    if out and out[-1] == "":
        out.pop()
    if pos > 0 and out:
        out.pop(0)  # first line is probably cut
    return out[-lines:] if lines > 0 else []


@dataclass(eq=False)
class _Managed:
    """One instance as the Supervisor runs it."""

    spec: InstanceSpec
    log_path: Path
    state: InstanceState = InstanceState.PENDING
    endpoint: str | None = None
    port: int | None = None
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    drain_requested: bool = False
    stopping: bool = False
    proc: asyncio.subprocess.Process | None = None
    launch: Launch | None = None
    task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    predecessor: asyncio.Task[None] | None = None  # stop of the instance this one replaces
    ready_since: float | None = None
    restart_delays: list[float] = field(default_factory=list)
    local_source: str | None = None  # where a remote source lies once fetched

    @property
    def drained(self) -> bool:
        return self.drain_requested or not self.spec.enabled


def _restart_key(spec: InstanceSpec) -> tuple[Any, ...]:
    """What, when it changes, needs a new runner (the rest is updated in place)."""
    key: tuple[Any, ...] = (spec.model, spec.backend, spec.source, json.dumps(spec.params, sort_keys=True, default=str))
    if spec.backend == "llama.cpp" and not {"parallel", "n_parallel"} & set(spec.params):
        # llama-server's slot count is max_concurrency: a new one needs a new server.
        key += (spec.max_concurrency,)
    return key


class Supervisor:
    def __init__(
        self,
        *,
        bind_host: str = "127.0.0.1",
        advertise_host: str = "127.0.0.1",
        port_start: int = 30000,
        log_dir: Path,
        startup_timeout: float = 600.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        stop_grace: float = 10.0,
        health_interval: float = 5.0,
        health_failures: int = 3,
        probe_timeout: float = 5.0,
        fetcher: Fetcher | None = None,
    ) -> None:
        self.bind_host = bind_host
        self.fetcher = fetcher
        self.advertise_host = advertise_host
        self.port_start = port_start
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_grace = stop_grace
        self.health_interval = health_interval
        self.health_failures = max(1, health_failures)
        self.probe_timeout = probe_timeout
        private_dir(self.log_dir)
        self._instances: dict[str, _Managed] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._changed = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        # Probes go to the runner's own address; a wildcard bind is reached on loopback.
        self._probe_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(bind_host, bind_host)

    # ----------------------------------------------------------------- public API

    @property
    def generation(self) -> int:
        """Grows on every status change: the agent sends statuses only when it moved."""
        return self._generation

    async def apply(self, specs: list[InstanceSpec]) -> None:
        """Make the running set match ``specs``: start new instances, stop those no longer
        wanted, restart those whose backend, source, model or params changed. Returns at
        once; starting and stopping go on in background tasks."""
        desired: dict[str, InstanceSpec] = {}
        for spec in specs:
            if spec.id in desired and _restart_key(desired[spec.id]) != _restart_key(spec):
                log.warning("instance %s listed twice with different specs; the last one wins", spec.id)
            desired[spec.id] = spec
        for iid, m in list(self._instances.items()):
            if iid in desired:
                continue
            if m.state == InstanceState.STOPPED and not m.stopping:
                del self._instances[iid]  # reported as stopped already; forget it
            elif not m.stopping:
                self._begin_stop(m)
        for iid, spec in desired.items():
            m = self._instances.get(iid)
            if m is None:
                self._start(spec)
            elif m.stopping or m.state == InstanceState.STOPPED:
                self._start(spec, predecessor=m)
            elif _restart_key(m.spec) != _restart_key(spec):
                log.info("instance %s: spec changed (backend, source, model or params); restarting", iid)
                self._begin_stop(m)
                self._start(spec, predecessor=m)
            else:
                was_drained, old_cap = m.drained, m.spec.max_concurrency
                m.spec = spec
                if m.drained != was_drained:
                    self._update_drain(m)
                if spec.max_concurrency != old_cap:
                    self._bump()  # reported in statuses: the agent must send it

    def statuses(self) -> list[InstanceStatus]:
        return [
            InstanceStatus(
                id=m.spec.id,
                state=m.state,
                endpoint=m.endpoint,
                restarts=m.restarts,
                last_error=m.last_error,
                model=m.spec.model,
                backend=m.spec.backend,
                source=m.spec.source,
                # llama-server's slots are what the instance serves at once (params.parallel
                # may differ from the deployment's max_concurrency).
                max_concurrency=m.launch.slots if m.launch is not None and m.launch.slots else m.spec.max_concurrency,
                pid=m.pid,
            )
            for m in self._instances.values()
        ]

    async def drain(self, instance_id: str) -> None:
        """Mark an instance draining: it keeps running and answering; the gateway sends it no
        new requests; the agent or controller decides when to stop it. Sticky until the
        instance leaves the desired set or is replaced."""
        m = self._instances.get(instance_id)
        if m is None:
            log.info("drain: no instance %s on this worker", instance_id)
            return
        m.drain_requested = True
        self._update_drain(m)

    def held_resources(self) -> dict[str, Any]:
        """Declared needs of the instances whose runner lives (starting, ready, draining):
        ``{"memory": bytes, "gpu_memory": {gpu_index: bytes}, "instances": n}``. Memory is
        ``params.memory`` or, undeclared, the model's size on disk."""
        memory = 0
        gpu_memory: dict[int, int] = {}
        count = 0
        for m in self._all_managed():
            if m.launch is None or m.launch.url is not None or m.state not in _ACTIVE:
                continue
            count += 1
            memory += m.launch.memory
            if m.launch.gpu_memory:
                indexes = m.launch.gpus or [0]
                share = m.launch.gpu_memory // len(indexes)
                for i in indexes:
                    gpu_memory[i] = gpu_memory.get(i, 0) + share
        return {"memory": memory, "gpu_memory": gpu_memory, "instances": count}

    def slot_targets(self) -> list[Target]:
        """Ready (or draining) runners that report their slots (llama-server): what the
        worker scrapes each heartbeat."""
        return [Target(m.spec.id, m.endpoint, m.launch.slots) for m in self._all_managed()
                if m.launch is not None and m.launch.slots > 0 and m.endpoint
                and m.state in (InstanceState.READY, InstanceState.DRAINING)]

    def logs(self, instance_id: str, lines: int = 100, request_id: str | None = None) -> list[str]:
        """The last ``lines`` lines of the instance's runner log (kept across restarts); with
        ``request_id``, the last ``lines`` of those that name it, searched in the last 4 MiB."""
        m = self._instances.get(instance_id)
        path = m.log_path if m is not None else self.log_dir / f"{sanitize_id(instance_id)}.log"
        if request_id is None:
            return _read_tail(path, max(0, lines))
        found = [line for line in _read_tail(path, 1 << 30) if request_id in line]
        return found[-lines:] if lines > 0 else []

    async def stop_all(self) -> None:
        """Stop every runner (SIGTERM, SIGKILL after stop_grace) and wait until they are gone."""
        for m in list(self._instances.values()):
            if not m.stopping and m.state != InstanceState.STOPPED:
                self._begin_stop(m)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # Extras for the agent and tests (not required by the agent's contract).

    async def wait_changed(self, since: int, wait_s: float) -> int:
        """Wait until ``generation`` differs from ``since`` (or the timeout); return it."""
        deadline = time.monotonic() + wait_s
        while self._generation == since:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
        return self._generation

    def describe(self, instance_id: str) -> dict[str, Any]:
        """Internal details of one instance (port, log path, restart delays so far)."""
        m = self._instances.get(instance_id)
        if m is None:
            return {}
        return {"id": instance_id, "state": m.state.value, "port": m.port, "pid": m.pid,
                "log_path": str(m.log_path), "restarts": m.restarts, "restart_delays": list(m.restart_delays),
                "argv": m.launch.argv if m.launch else None}

    # ---------------------------------------------------------------- internals

    def _all_managed(self) -> list[_Managed]:
        return list(self._instances.values())

    def _bump(self) -> None:
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _set(self, m: _Managed, **changes: Any) -> None:
        moved = False
        for key, value in changes.items():
            if getattr(m, key) != value:
                setattr(m, key, value)
                moved = True
        if "state" in changes and moved:
            reason = f": {m.last_error.splitlines()[0]}" if m.state == InstanceState.FAILED and m.last_error else ""
            where = f" at {m.endpoint}" if m.state == InstanceState.READY and m.endpoint else ""
            log.info("instance %s (%s %s): %s%s%s", m.spec.id, m.spec.backend, m.spec.model, m.state.value,
                     where, reason)
        if moved and self._instances.get(m.spec.id) is m:
            self._bump()

    def _update_drain(self, m: _Managed) -> None:
        if m.drained and m.state == InstanceState.READY:
            self._set(m, state=InstanceState.DRAINING)
        elif not m.drained and m.state == InstanceState.DRAINING:
            self._set(m, state=InstanceState.READY)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start(self, spec: InstanceSpec, predecessor: _Managed | None = None) -> None:
        m = _Managed(spec=spec, log_path=self.log_dir / f"{sanitize_id(spec.id)}.log")
        if predecessor is not None:
            m.predecessor = predecessor.stop_task
            m.drain_requested = False
        self._instances[spec.id] = m
        self._bump()
        m.task = asyncio.create_task(self._lifecycle(m), name=f"runner {spec.id}")
        self._track(m.task)

    def _begin_stop(self, m: _Managed) -> None:
        m.stopping = True
        m.stop_task = asyncio.create_task(self._stop(m), name=f"stop {m.spec.id}")
        self._track(m.stop_task)

    async def _stop(self, m: _Managed) -> None:
        try:
            if m.task is not None and not m.task.done():
                m.task.cancel()
                await asyncio.gather(m.task, return_exceptions=True)
            await self._terminate(m)
        except Exception:
            log.exception("instance %s: error while stopping", m.spec.id)
        finally:
            self._set(m, state=InstanceState.STOPPED, pid=None)
            m.stopping = False

    async def _terminate(self, m: _Managed) -> None:
        """SIGTERM to the runner's process group, SIGKILL after stop_grace; reaps it."""
        proc, m.proc = m.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the runner leads its own group
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_grace)
            except TimeoutError:
                log.warning("instance %s: runner %d ignored SIGTERM for %g s; killing it", m.spec.id, pgid,
                            self.stop_grace)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                await proc.wait()
        # The leader is gone; children it left in its group go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    async def _lifecycle(self, m: _Managed) -> None:
        try:
            if m.predecessor is not None:
                await asyncio.gather(m.predecessor, return_exceptions=True)
            if m.spec.backend in ATTACHED:
                await self._run_attached(m)
            else:
                # An unknown backend fails there like any config error (and heals if a
                # plug-in registers it later).
                await self._run_process(m)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the worker down
            log.exception("instance %s: supervisor error", m.spec.id)
            self._fail(m, f"internal supervisor error: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self._terminate(m)

    def _fail(self, m: _Managed, reason: str) -> None:
        self._set(m, last_error=reason, state=InstanceState.FAILED, pid=None)

    # ------------------------------------------------------------ process runners

    def _port_free(self, port: int) -> bool:
        with socket.socket(socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET) as s:
            # Servers (uvicorn) set SO_REUSEADDR: match it, so TIME_WAIT does not count as taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.bind_host, port))
            except OSError:
                return False
        return True

    def _pick_port(self, m: _Managed) -> int:
        taken = {o.port for o in self._instances.values() if o is not m and o.port and o.state != InstanceState.STOPPED}
        if m.port and m.port not in taken and self._port_free(m.port):
            return m.port  # keep the endpoint stable across restarts when possible
        for port in range(self.port_start, 65536):
            if port not in taken and self._port_free(port):
                return port
        raise LaunchError(f"no free port from {self.port_start} to 65535 on {self.bind_host}")

    def _endpoint(self, port: int) -> str:
        host = f"[{self.advertise_host}]" if ":" in self.advertise_host else self.advertise_host
        return f"http://{host}:{port}"

    async def _fetch(self, m: _Managed) -> str | None:
        """The local copy of a remote source (downloading it if needed), or None after a
        failure, which the instance reports until the next try."""
        if self.fetcher is None:
            self._fail(m, f"remote source {m.spec.source} needs a model cache (this Supervisor has no fetcher)")
            return None
        self._set(m, state=InstanceState.DOWNLOADING, last_error=None, endpoint=None)
        self._note(m, f"fetching {m.spec.source} into the model cache")
        try:
            path = await self.fetcher(m.spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"download failed: {exc}; trying again in {_fmt_seconds(self.backoff_max)} s"
            self._note(m, reason)
            self._fail(m, reason)
            return None
        self._note(m, f"{m.spec.source} is at {path}")
        return path

    def _note(self, m: _Managed, text: str) -> None:
        """A line about the instance in its log (what `modelfleet instances --logs` shows)."""
        with contextlib.suppress(OSError), m.log_path.open("ab") as f:
            f.write(f"{_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n".encode())

    async def _run_process(self, m: _Managed) -> None:
        backoff = self.backoff_initial
        while True:
            if m.local_source is None and is_remote(m.spec.source):
                m.local_source = await self._fetch(m)
                if m.local_source is None:
                    await asyncio.sleep(self.backoff_max)
                    continue
            spec = m.spec if m.local_source is None else m.spec.model_copy(update={"source": m.local_source})
            try:
                port = self._pick_port(m)
                launch = prepare_launch(spec, self.bind_host, port)
            except LaunchError as exc:
                # No restart can fix this, but the world can (a mount appears, a package is
                # installed): check again now and then, quietly, without starting anything.
                self._fail(m, str(exc))
                await asyncio.sleep(self.backoff_max)
                continue
            assert launch.argv, f"backend {m.spec.backend} returned no command"
            m.launch = launch
            self._set(m, port=port, endpoint=self._endpoint(port), state=InstanceState.STARTING)
            try:
                reason = await self._run_once(m, launch, port)
            except OSError as exc:
                self._fail(m, f"cannot start the runner: {exc}")
                return
            up_for = time.monotonic() - m.ready_since if m.ready_since is not None else 0.0
            m.ready_since = None
            if up_for >= self.backoff_max:
                backoff = self.backoff_initial  # it ran fine for a while: this is a fresh failure
            delay, backoff = backoff, min(backoff * 2, self.backoff_max)
            m.restart_delays.append(delay)
            self._fail(m, f"{reason}; restarting in {_fmt_seconds(delay)} s{self._log_excerpt(m)}")
            await asyncio.sleep(delay)
            self._set(m, restarts=m.restarts + 1)

    async def _run_once(self, m: _Managed, launch: Launch, port: int) -> str:
        """Start the runner, wait until ready, watch it; return why it ended. The runner is
        gone when this returns (except on cancellation: then _stop takes it down)."""
        if m.log_path.exists() and m.log_path.stat().st_size > LOG_ROTATE_BYTES:
            with contextlib.suppress(OSError):
                m.log_path.replace(m.log_path.with_suffix(".log.1"))
        env = {**runner_environ(), **launch.env}
        argv = with_parent_death_signal(launch.argv)
        with m.log_path.open("ab") as logf:
            logf.write(f"\n{_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} starting {m.spec.backend} runner for "
                       f"{m.spec.id} (start {m.restarts + 1}) on port {port}: {shlex.join(launch.argv)}\n"
                       .encode())
            logf.flush()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, close_fds=True)
        m.proc = proc
        self._set(m, pid=proc.pid)
        try:
            reason = await self._wait_ready(m, proc, launch, port)
            if reason is None:
                m.ready_since = time.monotonic()
                self._set(m, state=InstanceState.DRAINING if m.drained else InstanceState.READY)
                reason = await self._watch(m, proc, launch, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"supervisor error while watching the runner: {type(exc).__name__}: {exc}"
        await self._terminate(m)
        self._set(m, pid=None)
        return reason

    def _exit_reason(self, m: _Managed, rc: int, port: int) -> str:
        reason = (f"runner killed by signal {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals()
                  else f"runner exited with code {rc}")
        tail = "\n".join(self._attempt_lines(m, 40)).lower()
        if "address already in use" in tail or "errno 98" in tail:
            reason = f"port {port} is already in use ({reason})"
        return reason

    async def _probe(self, url: str) -> tuple[bool, str]:
        if self._client is None:
            # trust_env=False: a proxy from the environment must not sit between us and our runners.
            self._client = httpx.AsyncClient(trust_env=False, timeout=self.probe_timeout)
        try:
            r = await self._client.get(url, timeout=self.probe_timeout)
        except httpx.HTTPError as exc:
            return False, f"GET {url}: {type(exc).__name__}: {exc}".rstrip(": ")
        if r.status_code == 200:
            return True, ""
        return False, f"GET {url}: HTTP {r.status_code}"

    async def _wait_ready(self, m: _Managed, proc: asyncio.subprocess.Process, launch: Launch,
                          port: int) -> str | None:
        url = f"http://{self._probe_host}:{port}{launch.ready_path}"
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.1
        while True:
            if proc.returncode is not None:
                return self._exit_reason(m, proc.returncode, port) + " before it was ready"
            ok, _ = await self._probe(url)
            if ok and proc.returncode is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return f"not ready after {_fmt_seconds(self.startup_timeout)} s (no answer on {launch.ready_path})"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), min(delay, left))
            delay = min(delay * 1.5, 1.0)

    async def _watch(self, m: _Managed, proc: asyncio.subprocess.Process, launch: Launch, port: int) -> str:
        url = f"http://{self._probe_host}:{port}{launch.live_path}"
        failures = 0
        while True:
            try:
                rc = await asyncio.wait_for(proc.wait(), self.health_interval)
                return self._exit_reason(m, rc, port)
            except TimeoutError:
                pass
            ok, err = await self._probe(url)
            if ok:
                failures = 0
                continue
            failures += 1
            if proc.returncode is not None:
                return self._exit_reason(m, proc.returncode, port)
            if failures >= self.health_failures:
                return f"runner stopped answering ({failures} health checks failed; last: {err})"

    def _attempt_lines(self, m: _Managed, lines: int) -> list[str]:
        """The last lines the runner wrote since its latest start."""
        tail = _read_tail(m.log_path, 400)
        for i in range(len(tail) - 1, -1, -1):
            if tail[i].startswith(_HEADER):
                tail = tail[i + 1 :]
                break
        return [line for line in tail if line.strip()][-lines:]

    def _log_excerpt(self, m: _Managed) -> str:
        lines = self._attempt_lines(m, ERROR_TAIL_LINES)
        if not lines:
            return ""
        text = "\n".join(line[:500] for line in lines)
        return f"\nlast lines of {m.log_path}:\n{text}"

    # ------------------------------------------------------------ attached servers

    async def _run_attached(self, m: _Managed) -> None:
        try:
            launch = prepare_launch(m.spec, self.bind_host, 0)
        except LaunchError as exc:
            self._fail(m, str(exc))
            return
        assert launch.url
        m.launch = launch
        self._set(m, endpoint=launch.url, state=InstanceState.STARTING)
        url = launch.url + launch.ready_path
        failures = 0
        while True:
            ok, err = await self._probe(url)
            if ok:
                failures = 0
                if m.state not in (InstanceState.READY, InstanceState.DRAINING):
                    self._set(m, state=InstanceState.DRAINING if m.drained else InstanceState.READY)
            else:
                failures += 1
                if failures >= self.health_failures and m.state != InstanceState.FAILED:
                    self._fail(m, f"attached server does not answer: {err}")
            # Probe quickly until the first verdict, then at the health interval.
            await asyncio.sleep(min(0.5, self.health_interval) if m.state == InstanceState.STARTING
                                else self.health_interval)
