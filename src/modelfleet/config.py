"""Defaults shared by every role. Every CLI flag also reads a MODELFLEET_* variable (see cli.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

DEFAULT_CONTROLLER_PORT = 8100
DEFAULT_WORKER_PORT = 8200
DEFAULT_GATEWAY_PORT = 8000
DEFAULT_RUNNER_PORT_START = 30000


def modelfleet_home() -> Path:
    """$MODELFLEET_HOME, default ~/.modelfleet: the SQLite store, gateway snapshot, runner logs."""
    return Path(os.environ.get("MODELFLEET_HOME") or Path.home() / ".modelfleet")


def default_store_url() -> str:
    return f"sqlite:///{modelfleet_home() / 'state.db'}"


def hostname() -> str:
    return socket.gethostname()


def split_controllers(value: str | list[str] | None) -> list[str]:
    """'http://a:8100,http://b:8100' -> ['http://a:8100', 'http://b:8100'] (trailing / dropped)."""
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip().rstrip("/")
            if part:
                out.append(part if "://" in part else f"http://{part}")
    return out
