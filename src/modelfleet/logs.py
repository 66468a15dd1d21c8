"""How every modelfleet process logs: one line per event, as text or as JSON.

``setup_logging(role, level, fmt)`` is called once by each entry point (controller, worker,
gateway, up, the runners of our own backends). It

- writes one line per event: text (``TIME LEVEL component: message``, never wrapped, so a
  URL or a store address stays whole and greppable) or JSON (one object per line with
  ``time``, ``level``, ``role``, ``component``, ``message`` and the event's fields, given
  with ``extra=`` by the code that logs: model, instance, worker, request_id, status,
  duration_ms…);
- keeps third-party libraries (httpx logs every HTTP call at INFO, uvicorn, alembic,
  huggingface_hub…) at WARNING unless the level is DEBUG: at INFO an operator reads only
  modelfleet's own state changes;
- exports the format in ``MODELFLEET_LOG_FORMAT`` so that processes started from this one
  (gateway processes, runners of a worker) log the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from itertools import islice
from typing import Any, TextIO

import orjson

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT_ENV = "MODELFLEET_LOG_FORMAT"
ROLE_ENV = "MODELFLEET_LOG_ROLE"

# Libraries that log per call or per step at INFO; kept at WARNING unless --log-level debug.
THIRD_PARTY = (
    "httpx",
    "httpcore",
    "urllib3",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "alembic",
    "filelock",
    "huggingface_hub",
    "sentence_transformers",
    "transformers",
    "asyncio",
    "multipart",
    "python_multipart",
    "aiosqlite",
    "asyncpg",
    "redis",
    "torch",
    "llama_cpp",
    "vllm",
)

# The attributes every LogRecord has: anything else on a record came from ``extra=``.
# LogRecord.__init__ sets them first, then makeRecord adds the extras in order: the extras
# are the items after the first _RECORD_INIT ones (checked anyway, cheaply, on those only).
_RECORD_INIT = len(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

_HANDLER_MARK = "_modelfleet_handler"


_second: tuple[int, str] = (-1, "")


def iso_time(created: float) -> str:
    """UTC, millisecond precision, one fixed width: sortable across machines. The part up to
    the second is computed once per second (strftime is most of a line's formatting cost)."""
    global _second
    whole = int(created)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int(created * 1000) % 1000:03d}Z"


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached with ``extra=``, in the order given."""
    items = vars(record).items()
    tail = islice(items, _RECORD_INIT, None) if len(items) > _RECORD_INIT else ()
    return {k: v for k, v in tail if k not in _RECORD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO modelfleet.gateway: message``. The message carries what
    a person needs; fields given with ``extra=`` are for the JSON format and not repeated.
    A traceback follows on its own lines (a person reads it; JSON keeps it in one field)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{iso_time(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, role, component, message, then the event's
    fields (``extra=``); ``exc`` holds a traceback. Values JSON cannot hold are written as
    their ``str()``: a log line must never fail to be written."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "role": self.role,
            "component": record.name,
            "message": record.getMessage(),
        }
        for k, v in event_fields(record).items():
            obj.setdefault(k, v)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(obj, default=str).decode()
        except TypeError:  # what orjson refuses outright (an int over 64 bits, a non-str key)
            return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


def resolve_format(fmt: str | None) -> str:
    value = (fmt or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if value not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def resolve_level(level: str | None) -> int:
    value = (level or "INFO").strip().upper()
    if value not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(x.lower() for x in LEVELS)}, not {level!r}")
    return getattr(logging, value)


def setup_logging(role: str, level: str | None = "INFO", fmt: str | None = None, stream: TextIO | None = None) -> str:
    """Configure the root logger of this process for ``role``; returns the format in use.

    Raises ValueError on an unknown level or format (the CLI turns it into a usage error).
    Calling it again replaces what an earlier call installed (and nothing else's handlers)."""
    fmt = resolve_format(fmt)
    lvl = resolve_level(level)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for h in list(root.handlers):
        # Ours from an earlier call, or a bare default one (basicConfig by a library).
        if getattr(h, _HANDLER_MARK, False) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.getLogger("modelfleet").setLevel(lvl)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.NOTSET if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    # Neither format shows the caller's file and line, thread or process: skip computing
    # them for every record (the logging HOWTO's "Optimization"; a stack walk per line).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    os.environ[FORMAT_ENV] = fmt
    os.environ["MODELFLEET_LOG_LEVEL"] = logging.getLevelName(lvl)
    return fmt


def is_configured() -> bool:
    return any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger().handlers)


# --------------------------------------------------------------------------- request ids
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_MAX = 128
# Letters, digits and the punctuation of common id formats (uuid, ULID, W3C trace ids,
# "svc:1234/5"); nothing that could split a log line, a header or a JSON string.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,%d}" % REQUEST_ID_MAX)  # noqa: UP031 (braces of a regex)


def valid_request_id(value: str | bytes | None) -> str | None:
    """The client's id if it is safe to log and pass on, else None (the gateway makes one)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if _REQUEST_ID_RE.fullmatch(value) else None


def new_request_id() -> str:
    """32 hex digits, like a uuid4 without dashes (and as unguessable)."""
    return secrets.token_hex(16)
