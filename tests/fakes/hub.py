"""A local stand-in for the Hugging Face Hub, ModelScope and a plain file server, for tests
(nothing in the suite may reach the internet). It speaks the HTTP each client uses:

Hugging Face (``HF_ENDPOINT=http://127.0.0.1:PORT``), as huggingface_hub calls it:
- ``GET /api/models/{repo}[/revision/{rev}]?blobs=true``: ``sha`` (the commit) and
  ``siblings`` with ``rfilename``, ``size``, ``blobId`` and, for large files, ``lfs``
  (``sha256``, ``size``, ``pointerSize``);
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: small files answer 200 with ``ETag`` (git blob
  sha1), ``X-Repo-Commit`` and ``Content-Length``; large ("LFS") files answer 302 to the CDN
  (another port, so another origin) with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``; errors carry ``X-Error-Code`` (``RepoNotFound`` 401 for a missing or
  private repo without token, ``GatedRepo`` 401 for a gated repo without token,
  ``EntryNotFound`` 404, ``RevisionNotFound`` 404);
- the CDN (``GET /cdn/{sha256}``) and every file route honour ``Range: bytes=N-`` (206 with
  ``Content-Range``) and ``If-Range``.

ModelScope (``MODELSCOPE_ENDPOINT=http://127.0.0.1:PORT``): ``GET /api/v1/models/{repo}/repo/files``
(``{"Code": 200, "Data": {"Files": [{"Path", "Name", "Type", "Size", "Sha256", …}]}}``) and
``GET /api/v1/models/{repo}/repo?Revision=&FilePath=`` (302 to the CDN for large files).

Plain files: ``GET|HEAD /files/{name}``, also on an HTTPS port when a certificate is given.

The test drives it in-process: ``add_hf`` / ``add_modelscope`` / ``add_file`` register real
files, ``throttle`` limits the bytes per second of every file body (so a download can be
killed half-way), and ``stats`` counts what was served: downloads per file (a body that
started) and the ``Range`` header of each, which is how a test proves a resume and the
absence of a second download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

LFS_THRESHOLD = 1 << 20  # larger files are "LFS": served by the CDN, listed with sha256
CHUNK = 64 << 10


@dataclass
class Blob:
    data: Path
    size: int
    sha256: str
    git_sha1: str
    corrupt: bool = False  # serve it with one byte changed (a mirror gone bad)
    listed: int | None = None  # the size the listing claims, when it is not the real one

    @property
    def listed_size(self) -> int:
        return self.size if self.listed is None else self.listed


@dataclass
class Repo:
    scheme: str  # hf, modelscope
    name: str
    files: dict[str, Blob]
    commit: str
    gated: bool = False
    private: bool = False


@dataclass
class Served:
    """What the fake sent for one file (key: "hf:org/repo/path", "ms:…", "files:name")."""

    downloads: int = 0  # bodies started (200 or 206)
    ranges: list[str | None] = field(default_factory=list)  # the Range header of each
    heads: int = 0


def blob_of(path: Path, corrupt: bool = False) -> Blob:
    h256 = hashlib.sha256()
    size = path.stat().st_size
    h1 = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h256.update(block)
            h1.update(block)
    return Blob(data=path, size=size, sha256=h256.hexdigest(), git_sha1=h1.hexdigest(), corrupt=corrupt)


_blob_cache: dict[tuple[str, bool], Blob] = {}


def cached_blob(path: Path, corrupt: bool = False) -> Blob:
    key = (str(path), corrupt)
    if key not in _blob_cache:
        _blob_cache[key] = blob_of(path, corrupt)
    return _blob_cache[key]


class FakeHub:
    def __init__(self, token: str = "hf_good_token", cert: tuple[Path, Path] | None = None) -> None:
        self.token = token
        self.cert = cert
        self.repos: dict[tuple[str, str], Repo] = {}
        self.plain: dict[str, Blob] = {}
        self.cdn_blobs: dict[str, Blob] = {}  # key -> blob (the CDN URL names the file it serves)
        self.throttle: float | None = None  # bytes per second of every file body
        self.stats: dict[str, Served] = defaultdict(Served)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, a few headers
        self.port = self.cdn_port = self.https_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    # -- test-side API ---------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_hf(
        self,
        repo: str,
        files: dict[str, Path],
        *,
        gated: bool = False,
        private: bool = False,
        corrupt: tuple[str, ...] = (),
        sizes: dict[str, int] | None = None,
    ) -> Repo:
        return self._add("hf", repo, files, gated, private, corrupt, sizes or {})

    def add_modelscope(
        self,
        repo: str,
        files: dict[str, Path],
        *,
        private: bool = False,
        corrupt: tuple[str, ...] = (),
        sizes: dict[str, int] | None = None,
    ) -> Repo:
        return self._add("modelscope", repo, files, False, private, corrupt, sizes or {})

    def add_file(self, name: str, path: Path) -> Blob:
        self.plain[name] = cached_blob(path)
        return self.plain[name]

    def _add(
        self,
        scheme: str,
        repo: str,
        files: dict[str, Path],
        gated: bool,
        private: bool,
        corrupt: tuple[str, ...],
        sizes: dict[str, int],
    ) -> Repo:
        blobs = {p: replace(cached_blob(f, p in corrupt), listed=sizes.get(p)) for p, f in files.items()}
        commit = hashlib.sha1(f"{scheme}:{repo}:{sorted(b.sha256 for b in blobs.values())}".encode()).hexdigest()
        r = Repo(scheme=scheme, name=repo, files=blobs, commit=commit, gated=gated, private=private)
        self.repos[(scheme, repo)] = r
        for p, b in blobs.items():
            self.cdn_blobs[f"{scheme}:{repo}/{p}"] = b
        return r

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a worker (or fetch process) that uses this hub: endpoints, the TLS
        certificate, no HF_HUB_OFFLINE, no token, no stored login (a private HF_HOME)."""
        drop = ("HF_HUB_OFFLINE", "HF_TOKEN", "MODELSCOPE_API_TOKEN")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update({"HF_ENDPOINT": self.endpoint, "MODELSCOPE_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0"})
        if self.cert is not None:
            env.update({"SSL_CERT_FILE": str(self.cert[0]), "HF_HOME": str(self.cert[0].parent / "hf-home")})
        return {**env, **extra}

    def served(self, key: str) -> Served:
        with self._lock:
            return self.stats[key]

    def downloads(self, key: str) -> int:
        return self.served(key).downloads

    def reset_stats(self) -> None:
        with self._lock:
            self.stats.clear()
            self.requests.clear()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FakeHub:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-hub", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake hub did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start_sites())
        ready.set()
        self._loop.run_forever()

    async def _start_sites(self) -> None:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.hf_info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev:.+}", self.hf_info)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.hf_resolve)
        app.router.add_get("/cdn/{sha256}", self.cdn)
        app.router.add_get("/api/v1/models/{org}/{name}/repo/files", self.ms_files)
        app.router.add_get("/api/v1/models/{org}/{name}/repo", self.ms_file)
        app.router.add_get("/files/{name}", self.plain_file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sites = [web.TCPSite(self._runner, "127.0.0.1", 0), web.TCPSite(self._runner, "127.0.0.1", 0)]
        if self.cert is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            sites.append(web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx))
        for s in sites:
            await s.start()
        ports = [s._server.sockets[0].getsockname()[1] for s in sites]  # type: ignore[union-attr]
        self.port, self.cdn_port = ports[0], ports[1]
        if self.cert is not None:
            self.https_port = ports[2]

    # -- helpers ---------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        cookie = request.cookies.get("m_session_id", "")
        return auth == f"Bearer {self.token}" or cookie == self.token

    def _note(self, request: web.Request) -> None:
        with self._lock:
            self.requests.append(
                (
                    request.method,
                    request.path_qs,
                    {k: request.headers[k] for k in ("Authorization", "Range", "Host") if k in request.headers},
                )
            )

    @staticmethod
    def _hf_error(status: int, code: str, message: str, commit: str | None = None) -> web.Response:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        return web.json_response({"error": message}, status=status, headers=headers)

    def _repo(self, scheme: str, request: web.Request) -> Repo | None:
        return self.repos.get((scheme, f"{request.match_info['org']}/{request.match_info['name']}"))

    async def _send(self, request: web.Request, blob: Blob, key: str, headers: dict[str, str]) -> web.StreamResponse:
        """A file body with Range and If-Range, throttled, counted."""
        etag = f'"{blob.sha256}"'
        headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= blob.size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{blob.size}"})
            start, status = int(m.group(1)), 206
            end = int(m.group(2)) if m.group(2) else blob.size - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
            length = end - start + 1
        else:
            length = blob.size
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            with self._lock:
                self.stats[key].heads += 1
            return web.Response(status=status, headers=headers)
        with self._lock:
            self.stats[key].downloads += 1
            self.stats[key].ranges.append(rng)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        sent, t0 = 0, time.monotonic()
        with contextlib.suppress(ConnectionResetError, ConnectionError), blob.data.open("rb") as f:
            f.seek(start)
            while sent < length:
                chunk = f.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                if blob.corrupt and start + sent <= blob.size // 2 < start + sent + len(chunk):
                    i = blob.size // 2 - (start + sent)
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                await resp.write(chunk)
                sent += len(chunk)
                if self.throttle:
                    ahead = sent / self.throttle - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await resp.write_eof()
        return resp

    # -- Hugging Face ----------------------------------------------------------------
    async def hf_info(self, request: web.Request) -> web.Response:
        self._note(request)
        repo = self._repo("hf", request)
        if repo is None or (repo.private and not self._authorized(request)):
            return self._hf_error(401, "RepoNotFound", "Repository not found")
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", repo.commit):
            return self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        siblings = []
        for path, b in sorted(repo.files.items()):
            s: dict[str, Any] = {"rfilename": path}
            if request.query.get("blobs") in ("true", "True", "1"):
                s["size"] = b.listed_size
                s["blobId"] = b.git_sha1
                if b.size > LFS_THRESHOLD:
                    s["lfs"] = {"size": b.listed_size, "sha256": b.sha256, "pointerSize": 134}
            siblings.append(s)
        return web.json_response(
            {
                "_id": repo.commit[:24],
                "id": repo.name,
                "modelId": repo.name,
                "sha": repo.commit,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    async def hf_resolve(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        repo = self._repo("hf", request)
        if repo is None or (repo.private and not self._authorized(request)):
            return self._hf_error(401, "RepoNotFound", "Repository not found")
        if repo.gated and not self._authorized(request):
            return self._hf_error(
                401,
                "GatedRepo",
                f"Access to model {repo.name} is restricted. You must have "
                "access to it and be authenticated to access it. Please log in.",
            )
        rev = request.match_info["rev"]
        if rev not in ("main", repo.commit):
            return self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        path = request.match_info["path"]
        blob = repo.files.get(path)
        if blob is None:
            return self._hf_error(404, "EntryNotFound", f'{path} does not exist on "{rev}"', repo.commit)
        headers = {"X-Repo-Commit": repo.commit}
        key = f"hf:{repo.name}/{path}"
        if blob.size > LFS_THRESHOLD:
            location = f"http://127.0.0.1:{self.cdn_port}/cdn/{blob.sha256}?key={key}"
            with self._lock:
                self.stats[key].heads += request.method == "HEAD"
            return web.Response(
                status=302,
                headers={
                    **headers,
                    "Location": location,
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(blob.size),
                    "ETag": f'"{blob.git_sha1}"',
                },
            )
        resp = await self._send(request, blob, key, headers)
        resp.headers["ETag"] = f'"{blob.git_sha1}"'
        return resp

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        key = request.query.get("key", "")
        blob = self.cdn_blobs.get(key)
        if blob is None or blob.sha256 != request.match_info["sha256"]:
            return web.Response(status=404, text="no such object")
        return await self._send(request, blob, key, {})

    # -- ModelScope ------------------------------------------------------------------
    def _ms_error(self, status: int, message: str) -> web.Response:
        return web.json_response(
            {
                "Code": 10010205001 if status == 404 else status,
                "Message": message,
                "RequestId": "fake",
                "Success": False,
            },
            status=status,
        )

    def _ms_repo(self, request: web.Request) -> Repo | web.Response:
        """The ModelScope repo a request names, or the error the service answers."""
        self._note(request)
        repo = self._repo("modelscope", request)
        if repo is None:
            return self._ms_error(404, "model not found")
        if repo.private and not self._authorized(request):
            return self._ms_error(401, "no permission to access this model, please login")
        return repo

    async def ms_files(self, request: web.Request) -> web.Response:
        repo = self._ms_repo(request)
        if not isinstance(repo, Repo):
            return repo
        files = [
            {
                "Name": Path(p).name,
                "Path": p,
                "Type": "blob",
                "Size": b.listed_size,
                "Sha256": b.sha256,
                "Revision": repo.commit,
                "IsLFS": b.size > LFS_THRESHOLD,
            }
            for p, b in sorted(repo.files.items())
        ]
        return web.json_response({"Code": 200, "Data": {"Files": files}, "Message": "success", "Success": True})

    async def ms_file(self, request: web.Request) -> web.StreamResponse:
        repo = self._ms_repo(request)
        if not isinstance(repo, Repo):
            return repo
        path = request.query.get("FilePath", "")
        blob = repo.files.get(path)
        if blob is None:
            return self._ms_error(404, f"file {path} not found")
        key = f"modelscope:{repo.name}/{path}"
        if blob.size > LFS_THRESHOLD:
            raise web.HTTPFound(f"http://127.0.0.1:{self.cdn_port}/cdn/{blob.sha256}?key={key}")
        return await self._send(request, blob, key, {})

    # -- plain files -----------------------------------------------------------------
    async def plain_file(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        name = request.match_info["name"]
        blob = self.plain.get(name)
        if blob is None:
            return web.Response(status=404, text="not found")
        return await self._send(request, blob, f"files:{name}", {})


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (openssl), for the https:// source tests; clients trust it
    through SSL_CERT_FILE."""
    import subprocess

    cert, key = folder / "hub-cert.pem", folder / "hub-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
