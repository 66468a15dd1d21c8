"""What a remote source holds, asked of the hub that holds it; and how to GET each file.

- ``hf://`` goes through ``huggingface_hub`` (the pinned version): ``HfApi.model_info(...,
  files_metadata=True)`` lists the files with their sizes and checksums, and
  ``get_hf_file_metadata`` resolves each file (HEAD on ``/resolve``: commit, ETag, redirect to
  the CDN). So ``HF_ENDPOINT`` (mirrors), ``HF_TOKEN`` or a stored login, and the hub's
  error codes (gated, not found, revision) mean exactly what they mean to every HF tool, and
  ``HF_HUB_OFFLINE=1`` is honoured: such a machine fetches nothing from the Hub.
- ``modelscope://`` speaks ModelScope's documented HTTP API with httpx:
  ``GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=true`` (paths, sizes, sha256) and
  ``GET /api/v1/models/{repo}/repo?Revision=&FilePath=`` (the file, often a redirect to
  object storage). Endpoint: ``MODELSCOPE_ENDPOINT`` (the official client's variable; default
  https://modelscope.cn); token: ``MODELSCOPE_API_TOKEN``. docs/models.md says why not the
  ``modelscope`` package.
- ``https://`` (and ``http://``): a HEAD for the size; the checksum is the one the source gives.

Every failure is a ``FetchError`` whose ``kind`` says what to do about it and whose message
names the source and the HTTP status, fit to be an instance's last error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from modelfleet.sources import AmbiguousSource, Plan, RemoteFile, RemoteSource, SourceError, select_files, url_file_name

DEFAULT_TIMEOUT = 20.0
MODELSCOPE_DEFAULT_ENDPOINT = "https://modelscope.cn"
USER_AGENT = "modelfleet"


class FetchError(Exception):
    """A source that could not be listed or fetched. ``kind``: auth, gated, not_found,
    ambiguous, checksum, size, disk, network, server, offline."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message


def hf_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def modelscope_endpoint() -> str:
    value = (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "").strip()
    if not value:
        return MODELSCOPE_DEFAULT_ENDPOINT
    return (value if value.lower().startswith(("http://", "https://")) else f"https://{value}").rstrip("/")


def _server_message(response: httpx.Response) -> str:
    """What the server said about an error, in one short line."""
    message = response.headers.get("x-error-message") or ""
    if not message:
        try:
            body = response.json()
            if isinstance(body, dict):
                err = body.get("error")
                message = str(
                    body.get("Message")
                    or body.get("message")
                    or (err.get("message") if isinstance(err, dict) else err)
                    or ""
                )
        except ValueError:
            message = response.text[:200] if response.headers.get("content-type", "").startswith("text/") else ""
    return " ".join(message.split())[:300]


def _unreachable(src: RemoteSource, where: str, exc: Exception) -> FetchError:
    return FetchError("network", f"{src.display}: cannot reach {where}: {type(exc).__name__}: {exc}")


def http_error(src: RemoteSource, response: httpx.Response, what: str) -> FetchError:
    """A FetchError for an HTTP error answer about ``what`` (a file or the listing)."""
    status = response.status_code
    said = _server_message(response)
    said = f": {said}" if said else ""
    code = response.headers.get("x-error-code", "")
    if code == "GatedRepo" or (status == 401 and "gated" in said.lower()):
        token = "HF_TOKEN" if src.scheme == "hf" else "a token"
        return FetchError(
            "gated",
            f"{src.display}: gated repository ({status}{said}); accept its terms on the hub "
            f"and give the worker {token} with access",
        )
    if status in (401, 403):
        hint = {"hf": "set HF_TOKEN on the worker", "modelscope": "set MODELSCOPE_API_TOKEN on the worker"}.get(
            src.scheme, "the server refused the request"
        )
        return FetchError("auth", f"{src.display}: {what}: access denied ({status}{said}); {hint}")
    if status == 404:
        return FetchError("not_found", f"{src.display}: {what} not found (404{said})")
    if status == 429 or status >= 500:
        return FetchError("server", f"{src.display}: {what}: the server answered {status}{said}")
    return FetchError("server", f"{src.display}: {what}: unexpected answer {status}{said}")


# ---------------------------------------------------------------------------- Hugging Face


def _hf_error(src: RemoteSource, exc: Exception, what: str) -> FetchError:
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return FetchError(
            "offline",
            f"{src.display}: HF_HUB_OFFLINE is set on this machine, so nothing is fetched "
            "from the Hugging Face Hub (unset it, or use a local path)",
        )
    if isinstance(exc, errors.GatedRepoError):
        return FetchError(
            "gated",
            f"{src.display}: gated repository ({status or 401}: access to {src.repo} is "
            "restricted); accept its terms on the hub and give the worker HF_TOKEN with access",
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return FetchError("not_found", f"{src.display}: revision {src.rev} not found ({status or 404})")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return FetchError("not_found", f"{src.display}: {what} not found ({status or 404})")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return FetchError(
            "not_found",
            f"{src.display}: repository {src.repo} not found, or private and this worker "
            f"has no HF_TOKEN with access ({status or 404})",
        )
    if isinstance(exc, errors.HfHubHTTPError):
        if status in (401, 403):
            return FetchError("auth", f"{src.display}: {what}: access denied ({status}); check HF_TOKEN")
        return FetchError("server", f"{src.display}: {what}: the hub answered {status}: {first}")
    return FetchError(
        "network", f"{src.display}: cannot reach the hub at {hf_endpoint()}: {type(exc).__name__}: {first}"
    )


def _hf_offline(src: RemoteSource) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise _hf_error(src, OfflineModeIsEnabled("offline"), "listing")


def list_hf(src: RemoteSource, timeout: float) -> tuple[str, list[RemoteFile]]:
    """The commit a revision points at, and the repository's files with sizes and checksums."""
    from huggingface_hub import HfApi

    _hf_offline(src)
    try:
        info = HfApi(endpoint=hf_endpoint(), user_agent=USER_AGENT).model_info(
            src.repo, revision=src.rev, files_metadata=True, timeout=timeout
        )
    except Exception as exc:  # huggingface_hub and httpx2 errors, mapped by kind
        raise _hf_error(src, exc, "listing") from None
    files = [
        RemoteFile(
            path=s.rfilename, size=s.size, sha256=s.lfs.sha256 if s.lfs else None, git_sha1=None if s.lfs else s.blob_id
        )
        for s in info.siblings or []
    ]
    return info.sha or src.rev, files


@dataclass(frozen=True)
class FileRequest:
    """How to GET one file: the URL and the headers for its own host (credentials are sent
    only there, never to a CDN it redirects to)."""

    url: str
    headers: dict[str, str]


def hf_file_request(src: RemoteSource, commit: str, f: RemoteFile, timeout: float) -> FileRequest:
    """Resolve one file through the hub (HEAD on /resolve): typed errors, and the final
    location (the CDN for large files), which is then fetched with ranges."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    _hf_offline(src)
    url = hf_hub_url(src.repo, f.path, revision=commit, endpoint=hf_endpoint())
    try:
        meta = get_hf_file_metadata(url, timeout=timeout, user_agent=USER_AGENT, endpoint=hf_endpoint())
    except Exception as exc:
        raise _hf_error(src, exc, f.path) from None
    headers = build_hf_headers(user_agent=USER_AGENT)
    location = meta.location or url
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)
    return FileRequest(url=location, headers=headers)


# ---------------------------------------------------------------------------- ModelScope


def _modelscope_headers() -> dict[str, str]:
    headers = {"user-agent": USER_AGENT}
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    if token:
        # The legacy API reads the session cookie, the newer one the bearer header; the
        # official client sends both.
        headers["authorization"] = f"Bearer {token}"
        headers["cookie"] = f"m_session_id={token}"
    return headers


def list_modelscope(src: RemoteSource, timeout: float) -> tuple[str, list[RemoteFile]]:
    url = f"{modelscope_endpoint()}/api/v1/models/{src.repo}/repo/files"
    params = {"Revision": src.rev, "Recursive": "True"}
    try:
        r = httpx.get(url, params=params, headers=_modelscope_headers(), timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise _unreachable(src, f"ModelScope at {modelscope_endpoint()}", exc) from None
    if r.status_code >= 400:
        raise http_error(src, r, "repository listing")
    try:
        body = r.json()
        data: Any = body.get("Data", body) if isinstance(body, dict) else body
        entries = (data.get("Files") or data.get("files") or []) if isinstance(data, dict) else data
        files = []
        for e in entries:
            if (e.get("Type") or e.get("type") or "blob") == "tree":
                continue
            size = e.get("Size", e.get("size"))
            files.append(
                RemoteFile(
                    path=e.get("Path") or e.get("path") or e.get("Name"),
                    size=int(size) if size is not None else None,
                    sha256=(e.get("Sha256") or e.get("sha256") or None),
                )
            )
    except (ValueError, AttributeError, TypeError) as exc:
        raise FetchError("server", f"{src.display}: unreadable repository listing from {url}: {exc}") from None
    if isinstance(body, dict) and body.get("Success") is False:
        raise FetchError("not_found", f"{src.display}: {body.get('Message') or 'listing refused'}")
    return src.rev, files


def modelscope_file_request(src: RemoteSource, revision: str, f: RemoteFile) -> FileRequest:
    url = (
        f"{modelscope_endpoint()}/api/v1/models/{src.repo}/repo?Revision={quote(revision, safe='')}"
        f"&FilePath={quote(f.path, safe='')}"
    )
    return FileRequest(url=url, headers=_modelscope_headers())


# ---------------------------------------------------------------------------- plain URLs


def probe_url(src: RemoteSource, timeout: float) -> RemoteFile:
    """A URL source's size (HEAD; a one-byte range GET where HEAD is refused)."""
    headers = {"user-agent": USER_AGENT, "accept-encoding": "identity"}
    try:
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            r = client.head(src.url, headers=headers)
            size: int | None = None
            if r.status_code in (405, 501):
                r = client.get(src.url, headers={**headers, "range": "bytes=0-0"})
                total = r.headers.get("content-range", "").rpartition("/")[2]
                size = int(total) if total.isdigit() else None
            elif r.status_code < 400 and r.headers.get("content-length", "").isdigit():
                size = int(r.headers["content-length"])
    except httpx.HTTPError as exc:
        raise _unreachable(src, urlsplit(src.url).netloc, exc) from None
    if r.status_code >= 400:
        raise http_error(src, r, "file")
    return RemoteFile(path=url_file_name(src), size=size, sha256=src.sha256, url=src.url)


# ---------------------------------------------------------------------------- plans


def plan_source(src: RemoteSource, backend: str | None, timeout: float = DEFAULT_TIMEOUT) -> Plan:
    """Ask the hub what the source means: the files (with sizes and checksums) and the model path."""
    if src.scheme == "hf":
        revision, files = list_hf(src, timeout)
    elif src.scheme == "modelscope":
        revision, files = list_modelscope(src, timeout)
    else:
        f = probe_url(src, timeout)
        return Plan(source=src, revision="", files=[f], model_path=f.path)
    try:
        chosen, model_path = select_files(src, files, backend)
    except SourceError as exc:
        raise FetchError("ambiguous" if isinstance(exc, AmbiguousSource) else "not_found", str(exc)) from None
    return Plan(source=src, revision=revision, files=chosen, model_path=model_path)


def file_request(plan: Plan, f: RemoteFile, timeout: float = DEFAULT_TIMEOUT) -> FileRequest:
    src = plan.source
    if src.scheme == "hf":
        return hf_file_request(src, plan.revision, f, timeout)
    if src.scheme == "modelscope":
        return modelscope_file_request(src, plan.revision, f)
    return FileRequest(url=f.url or src.url, headers={"user-agent": USER_AGENT})
