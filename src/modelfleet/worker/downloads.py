"""Downloads on the worker: one per source at a time, shared by whoever needs it.

An instance whose source is remote asks ``fetch(source, backend, owner)`` for a local path;
``modelfleet models pull`` asks ``pull(...)``. The first ask starts ``python -m
modelfleet.worker.fetch`` (see fetch.py); later asks for the same source join it, so two
instances needing one file download it once (processes sharing the cache folder are kept
apart by the per-file locks of modelcache.py). When the last instance that wanted a download
goes away (its deployment was deleted or moved) the download is stopped; its partial file
stays and the next attempt resumes it. A pull is never stopped that way.

Progress (bytes done and total, rate over the last seconds, time left) is kept per download
and goes to the controller in the worker's resources on every heartbeat: no write beyond
the heartbeat's own, and the instance reports (which move only with the Supervisor's
generation) are not touched by it. Prometheus gauges and counters follow the same figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.hubs import DEFAULT_TIMEOUT
from modelfleet.metrics import (
    WORKER_DOWNLOAD_DONE,
    WORKER_DOWNLOAD_RATE,
    WORKER_DOWNLOAD_SIZE,
    WORKER_DOWNLOADED_BYTES,
    WORKER_DOWNLOADS,
    WORKER_MODEL_CACHE_BYTES,
    WORKER_MODEL_CACHE_SOURCES,
)
from modelfleet.models import DownloadProgress
from modelfleet.procutil import with_parent_death_signal
from modelfleet.sources import SourceError, parse_source
from modelfleet.worker.modelcache import ModelCache

log = logging.getLogger("modelfleet.worker")

RATE_WINDOW_S = 5.0
KEEP_FINISHED_S = 300.0
HELD_REFRESH_S = 30.0
PULL = "pull"


class FetchFailed(Exception):
    """A download that did not complete: ``kind`` as in hubs.FetchError, plus "cancelled"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(eq=False)
class Download:
    source: str  # canonical
    backend: str | None
    owners: set[str] = field(default_factory=set)
    pinned: bool = False  # a pull: runs to its end whoever else leaves
    stopping: bool = False  # cancelled (nobody wants it): a new ask starts a new download
    state: str = "resolving"  # resolving -> downloading -> done | failed
    done: int = 0
    total: int | None = None
    files: int = 0
    present: int = 0  # bytes already on disk when it started
    counted: int = 0  # bytes counted in the received-bytes metric so far
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str | None = None
    kind: str | None = None
    path: str | None = None
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    future: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None

    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic() if now is None else now
        recent = [(t, d) for t, d in self.samples if now - t <= RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        (t0, d0), (t1, d1) = recent[0], recent[-1]
        return max(0.0, (d1 - d0) / (t1 - t0)) if t1 > t0 else 0.0

    def view(self) -> DownloadProgress:
        rate = self.rate() if self.state == "downloading" else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total is not None else None
        return DownloadProgress(
            source=self.source,
            backend=self.backend,
            instances=sorted(o for o in self.owners if o != PULL),
            pulled=self.pinned,
            state=self.state,
            done=self.done,
            total=self.total,
            files=self.files,
            rate=round(rate, 1),
            eta_s=round(eta, 1) if eta is not None else None,
            elapsed_s=round((self.finished or time.monotonic()) - self.started, 1),
            error=self.error,
            path=self.path,
        )


class DownloadManager:
    def __init__(self, root: Path, log_dir: Path, *, timeout: float = DEFAULT_TIMEOUT, stop_grace: float = 5.0) -> None:
        self.cache = ModelCache(root)
        self.log_path = Path(log_dir) / "downloads.log"
        self.timeout = timeout
        self.stop_grace = stop_grace
        self.active: dict[tuple[str, str], Download] = {}
        self.finished: deque[Download] = deque(maxlen=32)
        self._held: list[str] = []
        self._held_at = -HELD_REFRESH_S

    # -- asks ------------------------------------------------------------------------
    async def fetch(self, source: str, backend: str | None, owner: str) -> str:
        """The local path of ``source``, downloaded into the cache if needed. Raises FetchFailed."""
        d = self._join(source, backend, owner)
        try:
            return await asyncio.shield(d.future)
        finally:
            self._leave(d, owner)

    def pull(self, source: str, backend: str | None) -> Download:
        """Start (or join) a download nobody waits for; it runs to its end."""
        d = self._join(source, backend, PULL)
        d.pinned = True
        return d

    def _join(self, source: str, backend: str | None, owner: str) -> Download:
        try:
            src = parse_source(source)
        except SourceError as exc:
            raise FetchFailed("invalid", str(exc)) from None
        if src is None:
            raise FetchFailed("invalid", f"{source!r} is not a remote source")
        key = (src.canonical, backend or "")
        d = self.active.get(key)
        if d is None or d.stopping:
            d = Download(source=src.canonical, backend=backend)
            self.active[key] = d
            d.task = asyncio.create_task(self._run(d), name=f"download {src.canonical}")
        d.owners.add(owner)
        return d

    def _leave(self, d: Download, owner: str) -> None:
        d.owners.discard(owner)
        if not d.owners and not d.pinned and not d.future.done() and d.task is not None:
            d.stopping = True
            d.task.cancel()

    # -- views -----------------------------------------------------------------------
    def progress(self) -> list[DownloadProgress]:
        """Active downloads (what the heartbeat carries)."""
        return [d.view() for d in self.active.values()]

    def recent(self) -> list[DownloadProgress]:
        now = time.monotonic()
        done = [d for d in self.finished if d.finished is not None and now - d.finished < KEEP_FINISHED_S]
        return self.progress() + [d.view() for d in reversed(done)]

    def held(self) -> list[str]:
        """Sources complete in the cache; rescanned after each download or prune, and every
        HELD_REFRESH_S seconds (someone may delete files by hand)."""
        now = time.monotonic()
        if now - self._held_at >= HELD_REFRESH_S:
            entries = self.cache.entries()
            self._held = [e.source for e in entries if e.complete]
            self._held_at = now
            WORKER_MODEL_CACHE_SOURCES.set(len(self._held))
            WORKER_MODEL_CACHE_BYTES.set(sum(e.bytes for e in entries if e.complete))
        return list(self._held)

    def disk_free(self) -> int | None:
        probe = self.cache.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return shutil.disk_usage(probe).free
        except OSError:
            return None

    def invalidate(self) -> None:
        self._held_at = -HELD_REFRESH_S

    # -- the download process --------------------------------------------------------
    async def _run(self, d: Download) -> None:
        argv = [
            sys.executable,
            "-m",
            "modelfleet.worker.fetch",
            "--cache",
            str(self.cache.root),
            "--source",
            d.source,
            "--timeout",
            str(self.timeout),
        ]
        if d.backend:
            argv += ["--backend", d.backend]
        from modelfleet.worker.supervisor import runner_environ  # the same secret-free environment as runners

        outcome = "failed"
        try:
            self.cache.root.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as logf:
                logf.write(
                    f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} fetch {d.source} ({d.backend or 'any'})\n".encode()
                )
                logf.flush()
                d.proc = await asyncio.create_subprocess_exec(
                    *with_parent_death_signal(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=logf,
                    env={**runner_environ(), "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,
                )
            assert d.proc.stdout is not None
            last: dict[str, Any] = {}
            async for raw in d.proc.stdout:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                last = ev
                self._on_event(d, ev)
            rc = await d.proc.wait()
            if last.get("event") == "done":
                d.path = str(last["path"])
                outcome = "ok" if last.get("downloaded") else "cached"
                d.state = "done"
                d.future.set_result(d.path)
                secs = time.monotonic() - d.started
                got = int(last.get("downloaded") or 0)
                if got:
                    log.info(
                        "download %s done: %s in %.1f s (%s/s)",
                        d.source,
                        _human(got),
                        secs,
                        _human(got / secs if secs > 0 else 0),
                    )
            else:
                kind = str(last.get("kind") or "io")
                msg = str(last.get("message") or f"the download process exited with code {rc}; see {self.log_path}")
                self._failed(d, kind, msg)
        except asyncio.CancelledError:
            outcome = "cancelled"
            await self._stop(d)
            self._failed(d, "cancelled", f"{d.source}: download stopped (no instance needs it any more)")
            raise
        except Exception as exc:  # never let a download take the agent down
            log.exception("download %s: unexpected error", d.source)
            self._failed(d, "io", f"{d.source}: {type(exc).__name__}: {exc}")
        finally:
            d.finished = time.monotonic()
            if self.active.get((d.source, d.backend or "")) is d:
                del self.active[(d.source, d.backend or "")]
            self.finished.append(d)
            WORKER_DOWNLOADS.labels(outcome).inc()
            for g in (WORKER_DOWNLOAD_DONE, WORKER_DOWNLOAD_SIZE, WORKER_DOWNLOAD_RATE):
                with contextlib.suppress(KeyError):
                    g.remove(d.source)
            self.invalidate()

    def _on_event(self, d: Download, ev: dict[str, Any]) -> None:
        now = time.monotonic()
        kind = ev.get("event")
        if kind == "plan":
            d.total, d.files = ev.get("total"), int(ev.get("files") or 0)
            d.done = d.present = int(ev.get("done") or 0)
            d.state = "downloading"
            if d.total is None or d.present < d.total:
                log.info(
                    "download %s started: %d file(s), %s%s",
                    d.source,
                    d.files,
                    _human(d.total),
                    f", {_human(d.present)} already on disk" if d.present else "",
                )
            WORKER_DOWNLOAD_SIZE.labels(d.source).set(d.total or 0)
        elif kind == "progress":
            done = int(ev.get("done") or 0)
            if done > d.done:
                WORKER_DOWNLOADED_BYTES.inc(done - d.done)
                d.counted += done - d.done
            d.done = done
        elif kind == "done":
            # Progress lines are thinned out: count the bytes received since the last one.
            WORKER_DOWNLOADED_BYTES.inc(max(0, int(ev.get("downloaded") or 0) - d.counted))
            d.done = int(ev.get("bytes") or d.done)
        else:
            return
        d.samples.append((now, d.done))
        WORKER_DOWNLOAD_DONE.labels(d.source).set(d.done)
        WORKER_DOWNLOAD_RATE.labels(d.source).set(d.rate(now))

    def _failed(self, d: Download, kind: str, message: str) -> None:
        d.state, d.kind, d.error = "failed", kind, message
        if kind != "cancelled":
            log.info("download %s failed: %s", d.source, message)
        else:
            log.info("download %s stopped: no instance needs it any more", d.source)
        if not d.future.done():
            d.future.set_exception(FetchFailed(kind, message))
            d.future.exception()  # retrieved: nobody may be waiting any more

    async def _stop(self, d: Download) -> None:
        proc = d.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def stop_all(self) -> None:
        for d in list(self.active.values()):
            if d.task is not None:
                d.task.cancel()
        tasks = [d.task for d in list(self.active.values()) if d.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- cache -----------------------------------------------------------------------
    def entries(self, in_use: set[str]) -> list[dict[str, Any]]:
        return [{**e.view(), "in_use": e.source in in_use} for e in self.cache.entries()]

    async def prune(self, in_use: set[str], only: str | None = None) -> dict[str, Any]:
        keep = set(in_use) | {d.source for d in self.active.values()}
        result = await asyncio.to_thread(self.cache.prune, keep, only)
        self.invalidate()
        if result["removed"]:
            log.info("model cache pruned: %d item(s), %s freed", len(result["removed"]), _human(result["freed"]))
        return result
