"""The worker's model cache: remote sources downloaded once, resumably and verified.

Layout under the cache root (``$MODELFLEET_HOME/models`` by default)::

    hf/ORG/REPO/COMMIT/FILE...            a Hugging Face snapshot, one folder per commit
    modelscope/ORG/REPO/REVISION/FILE...  the same for ModelScope
    url/HOST/HASH/NAME                    a plain URL (HASH: of the URL)
    .manifests/KEY.json                   one per source: its files, sizes, checksums, model path
    .locks/KEY.lock                       one per file, held while it downloads (other processes wait)

One copy per file: every source, instance and worker process sharing the root shares it.
A file downloads into ``NAME.partial`` beside its final place, with ``NAME.partial.json``
recording what it is a part of (checksum, size, ETag); an interrupted download (worker
killed, connection lost) resumes from the partial file with an HTTP range request. The
checksum (sha256 from the hub or ``#sha256=``, or the git blob id of small HF files) is
computed while the bytes arrive (the partial prefix is read once on resume); only a file
whose size and checksum match is renamed into place, and only a source whose files are
all in place gets its manifest. A wrong checksum deletes the partial file.

The download itself runs in ``python -m modelfleet.worker.fetch`` (a child process of the
worker, so that stopping a deployment stops its download); listing and pruning run in the
worker agent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from filelock import FileLock, Timeout

from modelfleet.hubs import DEFAULT_TIMEOUT, FetchError, FileRequest, file_request, http_error, plan_source
from modelfleet.sources import Plan, RemoteFile, RemoteSource, parse_source

CHUNK = 1 << 20
DISK_RESERVE = 256 << 20  # never fill the disk to the last byte: logs and the store live there too
TRANSIENT_RETRIES = 5
MANIFESTS = ".manifests"
LOCKS = ".locks"
Progress = Callable[[int], None]  # bytes added (negative when a restart discards bytes)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _safe(part: str) -> str:
    """A path segment from a revision or host (no separators, no dot-dot)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", part).strip(".") or "_"


@dataclass
class CacheEntry:
    """One cached source, as its manifest describes it."""

    source: str
    path: Path  # the model path a runner is given
    folder: Path  # the entry folder (the snapshot or the URL's folder)
    files: list[dict[str, Any]]
    bytes: int
    revision: str
    completed_at: float
    last_used: float
    complete: bool

    def view(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": str(self.path),
            "bytes": self.bytes,
            "files": len(self.files),
            "revision": self.revision,
            "completed_at": self.completed_at,
            "last_used": self.last_used,
            "complete": self.complete,
        }


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- layout ----------------------------------------------------------------------
    def entry_folder(self, plan: Plan) -> Path:
        src = plan.source
        if src.is_hub:
            org, name = src.repo.split("/", 1)
            return self.root / src.scheme / org / name / _safe(plan.revision or src.rev)
        host = _safe(src.url.split("://", 1)[1].split("/", 1)[0])
        # Keyed by the checksum too: a file fetched under one #sha256= is never taken for another.
        return self.root / "url" / host / _key(src.canonical)[:16]

    def manifest_path(self, canonical: str) -> Path:
        return self.root / MANIFESTS / f"{_key(canonical)}.json"

    def lock_path(self, target: Path) -> Path:
        return self.root / LOCKS / f"{_key(str(target.relative_to(self.root)))}.lock"

    # -- manifests -------------------------------------------------------------------
    def _read_manifest(self, path: Path) -> CacheEntry | None:
        try:
            data = json.loads(path.read_text())
            folder = self.root / data["folder"]
            files = list(data["files"])
            complete = all(_size_of(folder / f["path"]) == f.get("size", _size_of(folder / f["path"])) for f in files)
            return CacheEntry(
                source=data["source"],
                path=folder / data["model_path"] if data["model_path"] else folder,
                folder=folder,
                files=files,
                bytes=int(data.get("bytes") or 0),
                revision=data.get("revision", ""),
                completed_at=float(data.get("completed_at") or 0),
                last_used=float(data.get("last_used") or 0),
                complete=complete,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def entry(self, canonical: str) -> CacheEntry | None:
        return self._read_manifest(self.manifest_path(canonical))

    def entries(self) -> list[CacheEntry]:
        out = []
        for p in sorted((self.root / MANIFESTS).glob("*.json")):
            e = self._read_manifest(p)
            if e is not None:
                out.append(e)
        return sorted(out, key=lambda e: e.source)

    def held(self) -> list[str]:
        """Sources whose every file is in place (what the worker reports for placement)."""
        return [e.source for e in self.entries() if e.complete]

    def touch(self, canonical: str) -> None:
        """Record a use (an instance started from it), for ``cache`` listings and pruning by age."""
        path = self.manifest_path(canonical)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            data["last_used"] = time.time()
            _write_json(path, data)

    def write_manifest(self, plan: Plan, folder: Path) -> CacheEntry:
        data = {
            "source": plan.source.canonical,
            "folder": str(folder.relative_to(self.root)),
            "model_path": plan.model_path,
            "revision": plan.revision,
            "files": [
                {"path": f.path, "size": _size_of(folder / f.path), "sha256": f.sha256, "git_sha1": f.git_sha1}
                for f in plan.files
            ],
            "bytes": sum(_size_of(folder / f.path) or 0 for f in plan.files),
            "completed_at": time.time(),
            "last_used": time.time(),
        }
        path = self.manifest_path(plan.source.canonical)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, data)
        entry = self._read_manifest(path)
        assert entry is not None
        return entry

    # -- prune -----------------------------------------------------------------------
    def prune(self, keep: set[str], only: str | None = None, partials: bool = True) -> dict[str, Any]:
        """Delete cached sources not in ``keep`` (those in use), or just ``only``; files another
        kept source shares stay. With ``partials``, unfinished downloads nobody holds a lock
        on go too. Returns what was removed and how many bytes were freed."""
        entries = self.entries()
        kept_files = {
            e.folder / f["path"] for e in entries if e.source in keep or (only and e.source != only) for f in e.files
        }
        removed, freed = [], 0
        for e in entries:
            if e.source in keep or (only is not None and e.source != only):
                continue
            for f in e.files:
                p = e.folder / f["path"]
                if p in kept_files:
                    continue
                size = _size_of(p) or 0
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    freed += size
            with contextlib.suppress(FileNotFoundError):
                self.manifest_path(e.source).unlink()
            removed.append(e.source)
        if partials and only is None:
            for p in self.root.rglob("*.partial"):
                lock = FileLock(str(self.lock_path(p.with_suffix(""))))
                try:
                    with lock.acquire(timeout=0):
                        size = _size_of(p) or 0
                        p.unlink(missing_ok=True)
                        p.with_name(p.name + ".json").unlink(missing_ok=True)
                        freed += size
                        removed.append(f"partial download {p.relative_to(self.root)}")
                except Timeout:
                    continue  # a download is writing it
        self._remove_empty_dirs()
        return {"removed": removed, "freed": freed}

    def _remove_empty_dirs(self) -> None:
        for scheme in ("hf", "modelscope", "url"):
            base = self.root / scheme
            if not base.is_dir():
                continue
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only empty ones go

    # -- fetch -----------------------------------------------------------------------
    def fetch(
        self,
        source: str,
        backend: str | None,
        *,
        on_plan: Callable[[Plan, int], None] | None = None,
        progress: Progress | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> tuple[CacheEntry, int]:
        """Make ``source`` complete in the cache. Returns its entry and the bytes downloaded
        now (0 when it was all there). A hub that cannot be reached is not an error when the
        source is complete in the cache already (its last known revision is used)."""
        src = parse_source(source)
        if src is None:
            raise FetchError("not_found", f"{source!r} is not a remote source")
        try:
            plan = plan_source(src, backend, timeout)
        except FetchError as exc:
            cached = self.entry(src.canonical)
            if exc.kind in ("network", "server", "offline") and cached is not None and cached.complete:
                return cached, 0
            raise
        folder = self.entry_folder(plan)
        present = sum(_present_bytes(folder / f.path, f) for f in plan.files)
        if on_plan is not None:
            on_plan(plan, present)
        total = plan.total
        if total is not None:
            self._check_disk(folder, total - present, src)
        downloaded = 0
        for f in plan.files:
            downloaded += self.fetch_file(plan, f, folder / f.path, progress or (lambda n: None), timeout)
        return self.write_manifest(plan, folder), downloaded

    def _check_disk(self, folder: Path, need: int, src: RemoteSource) -> None:
        probe = folder
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need > max(0, free - DISK_RESERVE):
            raise FetchError(
                "disk",
                f"{src.display}: not enough disk space: {_gib(need)} to download, "
                f"{_gib(free)} free in {self.root} (keeping {_gib(DISK_RESERVE)} spare); "
                "free some with `modelfleet cache prune`",
            )

    def fetch_file(self, plan: Plan, f: RemoteFile, target: Path, progress: Progress, timeout: float) -> int:
        """One file into place, verified. Returns the bytes downloaded (0 if it was there)."""
        if _size_of(target) is not None and (f.size is None or _size_of(target) == f.size):
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.lock_path(target)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        reported = _present_bytes(target, f)
        lock = FileLock(str(lock_path))
        while True:
            # Another process downloads it: show its progress from the partial file's size.
            try:
                lock.acquire(timeout=0.5)
                break
            except Timeout:
                now = _size_of(partial) or 0
                if now != reported:
                    progress(now - reported)
                    reported = now
        try:
            if _size_of(target) is not None and (f.size is None or _size_of(target) == f.size):
                progress((f.size or 0) - reported)
                return 0
            req = file_request(plan, f, timeout)
            return _download(plan.source, f, req, target, partial, progress, reported, timeout)
        finally:
            lock.release()


def _download(
    src: RemoteSource,
    f: RemoteFile,
    req: FileRequest,
    target: Path,
    partial: Path,
    progress: Progress,
    reported: int,
    timeout: float,
) -> int:
    """Download ``f`` into ``partial`` (resuming it), verify it, rename it to ``target``."""
    meta_path = partial.with_name(partial.name + ".json")
    identity = {"url": req.url if not src.is_hub else "", "size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1}
    meta = _read_json(meta_path)
    if meta is None or {k: meta.get(k) for k in identity} != identity:
        partial.unlink(missing_ok=True)  # a part of something else (the file changed upstream)
        meta = dict(identity)
    _write_json(meta_path, meta)
    have = _size_of(partial) or 0
    if f.size is not None and have > f.size:
        partial.unlink()
        have = 0
    if have != reported:
        progress(have - reported)
    digest = _hasher(f)
    if digest is not None and have:
        with partial.open("rb") as fh:
            while block := fh.read(8 * CHUNK):
                digest.update(block)
    received_total = 0
    attempts = 0
    with httpx.Client(timeout=httpx.Timeout(timeout, read=max(timeout, 60.0)), trust_env=True) as client:
        while True:
            try:
                have, received = _transfer(client, src, f, req, partial, meta, meta_path, have, digest, progress)
                received_total += received
                break
            except _Restart:
                progress(-have)
                have = 0
                digest = _hasher(f)
                continue
            except (httpx.TransportError, _ShortBody) as exc:
                attempts += 1
                if attempts > TRANSIENT_RETRIES:
                    raise FetchError(
                        "network",
                        f"{src.display}: {f.path}: the download kept failing after "
                        f"{_gib(have)}: {type(exc).__name__}: {exc}",
                    ) from None
                have = _size_of(partial) or 0
                time.sleep(min(2**attempts, 10))
    expected = f.size if f.size is not None else meta.get("total")
    if expected is not None and have != expected:
        partial.unlink(missing_ok=True)
        raise FetchError(
            "size", f"{src.display}: {f.path}: got {have} bytes, expected {expected}; the partial download was deleted"
        )
    if digest is not None:
        got = digest.hexdigest()
        want = f.sha256 or f.git_sha1
        if got != want:
            partial.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            algo = "sha256" if f.sha256 else "git blob sha1"
            raise FetchError(
                "checksum",
                f"{src.display}: {f.path}: checksum mismatch: expected {algo} {want}, "
                f"got {got}; the download was deleted",
            )
    with partial.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, target)
    meta_path.unlink(missing_ok=True)
    return received_total


class _Restart(Exception):
    """The server sent the whole file instead of the range asked for: start over."""


class _ShortBody(Exception):
    """The connection ended before the announced length: resume."""


def _transfer(
    client: httpx.Client,
    src: RemoteSource,
    f: RemoteFile,
    req: FileRequest,
    partial: Path,
    meta: dict[str, Any],
    meta_path: Path,
    have: int,
    digest: Any,
    progress: Progress,
) -> tuple[int, int]:
    """One GET (following redirects by hand, so credentials never reach another host);
    returns (bytes in the partial file, bytes received)."""
    headers = {**req.headers, "accept-encoding": "identity"}
    if have:
        headers["range"] = f"bytes={have}-"
        if meta.get("etag") and not str(meta["etag"]).startswith("W/"):
            headers["if-range"] = meta["etag"]
    url = req.url
    origin = _origin(url)
    for _ in range(10):
        with client.stream("GET", url, headers=headers) as r:
            if r.is_redirect and "location" in r.headers:
                url = str(r.url.join(r.headers["location"]))
                if _origin(url) != origin:
                    headers = {k: v for k, v in headers.items() if k not in ("authorization", "cookie")}
                continue
            if r.status_code == 416 and have:
                partial.unlink(missing_ok=True)
                raise _Restart()
            if r.status_code >= 400:
                r.read()
                raise http_error(src, r, f.path)
            if have and r.status_code == 200:
                partial.unlink(missing_ok=True)
                raise _Restart()
            start = 0
            if r.status_code == 206:
                m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != have:
                    partial.unlink(missing_ok=True)
                    raise _Restart()
                start = have
                if m.group(3) != "*":
                    meta["total"] = int(m.group(3))
            elif r.headers.get("content-length", "").isdigit():
                meta["total"] = int(r.headers["content-length"])
            total = meta.get("total")
            if f.size is not None and total is not None and total != f.size:
                raise FetchError(
                    "size", f"{src.display}: {f.path}: the server sends {total} bytes, the listing says {f.size}"
                )
            if r.headers.get("etag"):
                meta["etag"] = r.headers["etag"]
            _write_json(meta_path, meta)
            received = 0
            length = int(r.headers["content-length"]) if r.headers.get("content-length", "").isdigit() else None
            with partial.open("ab" if start else "wb") as out:
                for chunk in r.iter_raw(CHUNK):
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise FetchError(
                                "disk", f"{src.display}: {f.path}: disk full after {_gib(start + received)} ({exc})"
                            ) from None
                        raise
                    if digest is not None:
                        digest.update(chunk)
                    received += len(chunk)
                    progress(len(chunk))
            if length is not None and received < length:
                raise _ShortBody(f"connection closed after {received} of {length} bytes")
            return start + received, received
    raise FetchError("server", f"{src.display}: {f.path}: too many redirects")


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}".lower()


def _hasher(f: RemoteFile) -> Any:
    if f.sha256:
        return hashlib.sha256()
    if f.git_sha1 and f.size is not None:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % f.size)  # git's object hash: what the hub lists for small files
        return h
    return None


def _present_bytes(target: Path, f: RemoteFile) -> int:
    """Bytes of ``f`` already on disk: the whole file, or its partial download."""
    size = _size_of(target)
    if size is not None and (f.size is None or size == f.size):
        return size
    return _size_of(target.with_name(target.name + ".partial")) or 0


def _size_of(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size if not path.is_dir() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _gib(n: int | float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 30) else f"{n / (1 << 20):.1f} MiB"
