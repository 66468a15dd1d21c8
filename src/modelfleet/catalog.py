"""The catalog: models known to work with each backend, deployable by name.

The built-in entries live in ``catalog.yaml`` beside this file; an operator's YAML file in
the same format (``--catalog PATH`` / ``MODELFLEET_CATALOG``) adds entries and overrides
built-in ones of the same name. The controller serves the merged catalog
(``GET /v1/cluster/catalog``) and fills a deployment that names an entry; a worker uses it
for ``--model NAME``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from modelfleet.sources import SourceError, parse_source

BUILTIN = Path(__file__).with_name("catalog.yaml")
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the entry."""


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "1.5 GiB" or "500MB"."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (bytes, or e.g. '1.5 GiB')")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


class CatalogEntry(BaseModel):
    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    source: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    kind: str = Field(default="chat", pattern="^(chat|embedding)$")
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    size: int = 0  # bytes to download
    memory: int = 0  # RAM one replica needs (CPU)
    gpu_memory: int = 0  # GPU memory one replica needs, all layers on the GPU
    origin: str = "built-in"  # or the file it came from

    @field_validator("size", "memory", "gpu_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        try:
            parse_source(v)
        except SourceError as exc:
            raise ValueError(str(exc)) from None
        return v


def _load_file(path: Path, origin: str) -> list[CatalogEntry]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CatalogError(f"catalog {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {path}: not valid YAML: {exc}") from None
    items = data.get("models") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise CatalogError(f"catalog {path}: expected a top-level `models:` list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CatalogError(f"catalog {path}: entry {i + 1} is not a mapping")
        try:
            out.append(CatalogEntry.model_validate({**item, "origin": origin}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            name = item.get("name", f"#{i + 1}")
            raise CatalogError(f"catalog {path}: entry {name}: {where}: {first['msg']}") from None
    return out


def load_catalog(extra: str | Path | None = None) -> dict[str, CatalogEntry]:
    """The built-in catalog plus ``extra`` (default: $MODELFLEET_CATALOG), by name."""
    entries = {e.name: e for e in _load_file(BUILTIN, "built-in")}
    path = extra if extra is not None else os.environ.get("MODELFLEET_CATALOG")
    if path:
        for e in _load_file(Path(path).expanduser(), str(path)):
            entries[e.name] = e
    return dict(sorted(entries.items()))
