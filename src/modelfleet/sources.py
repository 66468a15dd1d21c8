"""Model sources: what a deployment's ``--model`` may name, and which files that means.

    /models/qwen.gguf, ~/models/minilm          a file or folder on the worker
    smollm2-135m-instruct                        a bundled model (modelfleet.bundled)
    hf://ORG/REPO[:QUANT][@REVISION]             a Hugging Face repository
    hf://ORG/REPO/FILE[@REVISION]                one file (or one folder) of it
    modelscope://ORG/REPO[:QUANT][/FILE][@REV]   the same on ModelScope
    https://HOST/PATH[#sha256=HEX]               a plain file (http:// too, for a mirror on your network)

A repository means, for ``llama.cpp``, its one GGUF model (``:QUANT`` picks one of several
quantizations, as in llama.cpp's ``-hf ORG/REPO:Q4_K_M``; a split GGUF counts as one), and
for every other backend the repository's snapshot minus the weights in formats no runner
here loads (ONNX, TensorFlow, Flax, OpenVINO, and ``*.bin`` next to ``*.safetensors``).

This module is pure: parsing, canonical names and the choice of files. Talking to the hubs
is ``modelfleet.hubs``; downloading is ``modelfleet.worker.modelcache``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

HUB_SCHEMES = {"hf": "main", "modelscope": "master"}  # scheme -> default revision
URL_SCHEMES = ("https", "http")
GGUF_BACKENDS = ("llama.cpp", "llama-cpp-python")

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_RE = re.compile(rf"^(?P<org>{_NAME})/(?P<name>{_NAME})(?::(?P<quant>[A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}))?$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)

# Files a snapshot leaves out: weights for runtimes no backend here uses, and repo chrome.
SNAPSHOT_SKIP = (
    ".gitattributes",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "openvino/*",
    "*.tflite",
    "coreml/*",
    "*.mlmodel",
    "*.mlpackage/*",
    "*.gguf",
    "*.ggml",
    "*.pte",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.gif",
)
# Left out only when the repo also has *.safetensors (the same weights, in a format loaded without pickle).
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth")


class SourceError(ValueError):
    """A source that cannot be used as written: bad syntax, or a choice only its author can make
    (which of several GGUF files). The message is fit for the user who typed it."""


class AmbiguousSource(SourceError):
    """A repository with several GGUF models and no choice of one: the message lists them."""


@dataclass(frozen=True)
class RemoteSource:
    """A parsed remote source. ``canonical`` is the one spelling of it: the cache, the placement
    and the worker's report of what it holds all use it."""

    scheme: str  # hf, modelscope, https, http
    repo: str = ""  # ORG/REPO (hubs)
    file: str | None = None  # a file or folder in the repo
    revision: str | None = None  # as given; None = the hub's default branch
    quant: str | None = None  # GGUF quantization to pick (hubs, no file)
    url: str = ""  # https/http: the URL without its fragment
    sha256: str | None = None  # https/http: expected checksum (#sha256=)

    @property
    def is_hub(self) -> bool:
        return self.scheme in HUB_SCHEMES

    @property
    def rev(self) -> str:
        """The revision to ask for: as given, else the hub's default branch."""
        return self.revision or HUB_SCHEMES.get(self.scheme, "")

    @property
    def canonical(self) -> str:
        if not self.is_hub:
            return f"{self.url}#sha256={self.sha256}" if self.sha256 else self.url
        quant = f":{self.quant.upper()}" if self.quant else ""
        path = f"/{self.file}" if self.file else ""
        return f"{self.scheme}://{self.repo}{quant}{path}@{self.rev}"

    @property
    def display(self) -> str:
        """The canonical form without secrets or long fragments, for messages and logs."""
        return self.url if not self.is_hub else self.canonical

    def __str__(self) -> str:
        return self.canonical


def parse_source(text: str) -> RemoteSource | None:
    """A remote source, or None for a local path or bundled name. Raises SourceError for a
    remote source that does not parse."""
    text = (text or "").strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        return None
    scheme = scheme.lower()
    if scheme in URL_SCHEMES:
        return _parse_url(text)
    if scheme not in HUB_SCHEMES:
        raise SourceError(
            f"unknown source scheme {scheme}:// in {text!r} (use hf://, modelscope://, https:// or a path)"
        )
    return _parse_hub(scheme, rest, text)


def _parse_hub(scheme: str, rest: str, text: str) -> RemoteSource:
    form = f"{scheme}://ORG/REPO[:QUANT][/FILE][@REVISION]"
    revision: str | None = None
    head = rest
    if "@" in rest:
        head, _, revision = rest.rpartition("@")
        if not revision or not _REVISION_RE.match(revision) or ".." in revision:
            raise SourceError(f"{text!r}: bad revision {revision!r} (expected {form})")
    parts = [p for p in head.split("/")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SourceError(f"{text!r}: expected {form}")
    m = _REPO_RE.match(f"{parts[0]}/{parts[1]}")
    if not m:
        raise SourceError(f"{text!r}: bad repository {parts[0]}/{parts[1]!r} (expected {form})")
    file = "/".join(parts[2:]).strip("/") or None
    if file is not None and (any(p in ("", ".", "..") for p in file.split("/")) or "\\" in file):
        raise SourceError(f"{text!r}: bad file path {file!r}")
    quant = m.group("quant")
    if quant and file:
        raise SourceError(f"{text!r}: give a file or a quantization, not both")
    return RemoteSource(
        scheme=scheme,
        repo=f"{m.group('org')}/{m.group('name')}",
        file=file,
        revision=revision,
        quant=quant.upper() if quant else None,
    )


def _parse_url(text: str) -> RemoteSource:
    url, _, fragment = text.partition("#")
    parts = urlsplit(url)
    if not parts.netloc or not parts.path.strip("/"):
        raise SourceError(f"{text!r}: a URL source must name a file (https://host/path/model.gguf)")
    sha256 = None
    if fragment:
        key, eq, value = fragment.partition("=")
        if key != "sha256" or not eq or not _SHA256_RE.match(value.lower()):
            raise SourceError(f"{text!r}: the only fragment understood is #sha256=<64 hex digits>")
        sha256 = value.lower()
    return RemoteSource(scheme=parts.scheme.lower(), url=url, sha256=sha256)


def is_remote(text: str) -> bool:
    return "://" in (text or "")


def canonical_source(text: str) -> str:
    """The canonical spelling of a remote source; local paths and names unchanged. A source
    that does not parse is returned as is (validation reports it elsewhere)."""
    try:
        src = parse_source(text)
    except SourceError:
        return text
    return src.canonical if src is not None else text


def with_quant(source: str, quant: str) -> str:
    """``deploy --quant Q4_K_M``: the source with that quantization chosen."""
    src = parse_source(source)
    if src is None or not src.is_hub:
        raise SourceError(f"--quant applies to hf:// and modelscope:// repositories, not {source!r}")
    if src.file:
        raise SourceError(f"--quant with a file already chosen ({src.file}): give one or the other")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", quant):
        raise SourceError(f"bad quantization {quant!r} (e.g. Q4_K_M)")
    return replace(src, quant=quant.upper()).canonical


# ------------------------------------------------------------------------------ which files


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch. Checksums are what the hub publishes: sha256 for LFS files
    (Hugging Face) and every file (ModelScope), the git blob sha1 for small HF files."""

    path: str  # relative path in the repo (for a URL: its file name)
    size: int | None
    sha256: str | None = None
    git_sha1: str | None = None
    url: str = ""  # where to GET it, when known without asking the hub again


@dataclass
class Plan:
    """What one source means on disk: the files, and which path the runner is given."""

    source: RemoteSource
    revision: str  # the commit (hf), the revision (modelscope), "" (URLs)
    files: list[RemoteFile] = field(default_factory=list)
    model_path: str = ""  # relative to the entry folder; "" = the folder itself

    @property
    def total(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)


def gguf_quant_matches(path: str, quant: str) -> bool:
    """Does a GGUF file name carry this quantization? Matched as a token between - or . so
    that Q4_K does not pick q4_k_m (quantization names contain underscores)."""
    stem = PurePosixPath(path).name
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    split = _SPLIT_RE.match(PurePosixPath(path).name)
    if split:
        stem = split.group("stem")
    return re.search(rf"(?:^|[-.]){re.escape(quant)}(?:$|[-.])", stem, re.IGNORECASE) is not None


def gguf_quant(path: str) -> str | None:
    """The quantization a GGUF file name carries (``…-q4_k_m.gguf`` -> ``Q4_K_M``), if any."""
    name = PurePosixPath(path).name
    split = _SPLIT_RE.match(name)
    stem = split.group("stem") if split else name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    last = re.split(r"[-.]", stem)[-1]
    return last.upper() if re.fullmatch(r"(i?q\d[a-z0-9_]*|b?f16|f32|fp16|fp32)", last, re.IGNORECASE) else None


def _human(n: int | None) -> str:
    if n is None:
        return "size unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _gguf_models(files: list[RemoteFile]) -> list[list[RemoteFile]]:
    """GGUF models of a repo: single files, and split sets (-00001-of-0000N) grouped as one.
    Multimodal projectors (mmproj-*) are not models."""
    singles: list[list[RemoteFile]] = []
    splits: dict[str, list[RemoteFile]] = {}
    for f in files:
        name = PurePosixPath(f.path).name
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
            continue
        m = _SPLIT_RE.match(name)
        if m:
            splits.setdefault(str(PurePosixPath(f.path).parent / m.group("stem")), []).append(f)
        else:
            singles.append([f])
    groups = singles + [sorted(parts, key=lambda f: f.path) for parts in splits.values()]
    return sorted(groups, key=lambda g: g[0].path)


def _describe_models(models: list[list[RemoteFile]]) -> str:
    out = []
    for group in models:
        size = None if any(f.size is None for f in group) else sum(f.size or 0 for f in group)
        parts = f", {len(group)} parts" if len(group) > 1 else ""
        out.append(f"{group[0].path} ({_human(size)}{parts})")
    return "; ".join(out)


def wants_gguf(backend: str | None, files: list[RemoteFile]) -> bool:
    """llama.cpp takes one GGUF; with no backend given (``models pull``), a repo of GGUF
    files without a config.json is a GGUF repo."""
    if backend is not None:
        return backend in GGUF_BACKENDS
    names = {PurePosixPath(f.path).name for f in files}
    return any(n.lower().endswith(".gguf") for n in names) and "config.json" not in names


def select_files(src: RemoteSource, files: list[RemoteFile], backend: str | None) -> tuple[list[RemoteFile], str]:
    """The files of a repository listing that a source needs, and the model path the runner
    gets (relative to the snapshot folder; "" = the folder). Raises SourceError."""
    where = f"{src.scheme}://{src.repo}@{src.rev}"
    if src.file:
        exact = [f for f in files if f.path == src.file]
        if exact:
            return exact, src.file
        under = [f for f in files if f.path.startswith(src.file.rstrip("/") + "/")]
        if under:
            return sorted(under, key=lambda f: f.path), src.file
        sample = ", ".join(sorted(f.path for f in files)[:20]) or "none"
        raise SourceError(f"{where} has no file {src.file!r} (files: {sample})")
    if wants_gguf(backend, files):
        models = _gguf_models(files)
        if not models:
            raise SourceError(f"{where} has no GGUF file (backend {backend or 'llama.cpp'} needs one)")
        if src.quant:
            chosen = [g for g in models if gguf_quant_matches(g[0].path, src.quant)]
            if not chosen:
                raise SourceError(
                    f"{where} has no GGUF file for quantization {src.quant} (available: {_describe_models(models)})"
                )
            if len(chosen) > 1:
                raise AmbiguousSource(
                    f"{where}: quantization {src.quant} matches {len(chosen)} GGUF files: "
                    f"{_describe_models(chosen)}; name the file: {where.split('@')[0]}/FILE"
                )
            models = chosen
        if len(models) > 1:
            example = next((q for g in models if (q := gguf_quant(g[0].path))), "Q4_K_M")
            raise AmbiguousSource(
                f"{where} has {len(models)} GGUF files: {_describe_models(models)}; choose one with "
                f"--quant (e.g. --quant {example}, or {src.scheme}://{src.repo}:{example}) or name "
                f"the file ({src.scheme}://{src.repo}/FILE)"
            )
        group = models[0]
        return group, group[0].path
    if src.quant:
        raise SourceError(
            f"{where}: a quantization ({src.quant}) only means something for a GGUF model "
            f"(backend llama.cpp); backend {backend} takes the whole repository"
        )
    names = [f.path for f in files]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    skip = SNAPSHOT_SKIP + (PICKLE_WEIGHTS if has_safetensors else ())
    if backend in ("transformers", "sentence-transformers", "vllm") and "config.json" not in names:
        raise SourceError(
            f"{where} has no config.json: backend {backend} needs a Hugging Face model repository "
            "(for a GGUF repository use backend llama.cpp)"
        )
    chosen = [f for f in files if not any(fnmatch.fnmatch(f.path, pat) for pat in skip)]
    if not chosen:
        raise SourceError(f"{where} has no files a {backend or 'model'} runner can load")
    return sorted(chosen, key=lambda f: f.path), ""


def url_file_name(src: RemoteSource) -> str:
    """The file name a URL source is saved under (its last path segment)."""
    name = unquote(PurePosixPath(urlsplit(src.url).path).name) or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "model"
