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


class SecretFileError(ValueError):
    """A token file that cannot be used; the message names the path, never the content."""


def read_secret_file(path: str | Path) -> str:
    """The secret in ``path``, stripped of surrounding whitespace (a trailing newline, as
    editors and `kubectl create secret --from-file` leave). Unreadable or empty: an error
    naming the path."""
    p = Path(path).expanduser()
    try:
        value = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SecretFileError(f"cannot read token file {p}: {reason}") from None
    if not value:
        raise SecretFileError(f"token file {p} is empty")
    return value


def resolve_token(token: str | None, token_file: str | Path | None, what: str) -> str | None:
    """A token given directly or through a file (``--X-token`` or ``--X-token-file``), never both.
    Files are the recommended way: a flag's value is readable by every user of the machine
    in /proc/PID/cmdline."""
    if token and token_file:
        raise SecretFileError(f"give the {what} token or a file that holds it, not both")
    if token_file:
        return read_secret_file(token_file)
    return token or None


def private_dir(path: Path) -> Path:
    """Create ``path`` and whatever of its parents is missing with mode 0700: modelfleet's
    state (the SQLite store with key hashes, the route snapshot, logs) is for its own user.
    A folder that already exists keeps the mode its owner gave it."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # created meanwhile by another process
            continue
        os.chmod(d, 0o700)  # mkdir's mode passes through the umask; 0700 is what we want either way
    return path
