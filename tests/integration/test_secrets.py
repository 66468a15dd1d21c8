"""Secrets off the command line and state for its own user only: roles started with token
files (never the token in /proc/PID/cmdline), the CLI's client commands with a file or its
variable, the errors a bad file gives (naming the path, never the content), and the modes of
a fresh controller home, SQLite store and gateway snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelfleet.config import SecretFileError, private_dir, resolve_token
from tests.conftest import free_port
from tests.support.procs import MODELFLEET, Procs, wait_for

pytestmark = pytest.mark.timeout(120)
ADMIN, JOIN = "admin-from-a-file-4d1c", "join-from-a-file-93b0"


def secret_file(path: Path, content: str) -> str:
    path.write_text(content)
    path.chmod(0o600)
    return str(path)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    return subprocess.run(
        [*MODELFLEET, *args], capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}
    )


def test_roles_read_tokens_from_files_and_keep_them_off_the_command_line(procs: Procs, tmp_path: Path) -> None:
    admin_file = secret_file(tmp_path / "admin", f"  {ADMIN}\n\n")  # surrounding whitespace is not the token
    join_file = secret_file(tmp_path / "join", f"{JOIN}\n")
    home = tmp_path / "fresh" / "home"  # does not exist yet
    port = free_port()
    ctl = f"http://127.0.0.1:{port}"
    controller = procs.controller(
        "ctl",
        port,
        "",
        "--admin-token-file",
        admin_file,
        "--join-token-file",
        join_file,
        env={"MODELFLEET_HOME": str(home)},
    )  # --store "": the default, SQLite under $MODELFLEET_HOME
    assert ADMIN not in cmdline(controller.pid) and JOIN not in cmdline(controller.pid)
    assert httpx.get(f"{ctl}/v1/cluster/workers").status_code == 401
    assert httpx.get(f"{ctl}/v1/cluster/workers", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200

    worker = procs.worker(
        "w1",
        free_port(),
        ctl,
        "--join-token-file",
        join_file,
        "--heartbeat-interval",
        "0.5",
        env={"MODELFLEET_HOME": str(home)},
    )
    worker.wait_ready(60)
    assert JOIN not in cmdline(worker.pid)

    gport = free_port()
    snapshot = tmp_path / "gw-state" / "routes.json"  # its folder does not exist yet either
    gateway = procs.start(
        "gw",
        [
            sys.executable,
            "-m",
            "modelfleet.gateway",
            "--controller",
            ctl,
            "--port",
            str(gport),
            "--host",
            "127.0.0.1",
            "--snapshot-path",
            str(snapshot),
        ],
        env={"MODELFLEET_ADMIN_TOKEN_FILE": admin_file},
        ready_url=f"http://127.0.0.1:{gport}/health/ready",
    ).wait_ready(30)
    assert ADMIN not in cmdline(gateway.pid)
    wait_for(snapshot.exists, 10, what="route snapshot written")
    r = httpx.get(f"http://127.0.0.1:{gport}/v1/gateway/status", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["route_table"]["state"] == "fresh"  # its token reached the controller

    # The CLI's client commands: a file, or the variable naming one.
    listed = run_cli("workers", "--json", "--controller", ctl, "--admin-token-file", admin_file)
    assert listed.returncode == 0 and '"w1"' in listed.stdout, listed.stderr
    via_env = run_cli("models", "--controller", ctl, env={"MODELFLEET_ADMIN_TOKEN_FILE": admin_file})
    assert via_env.returncode == 0, via_env.stderr

    # State for this user only.
    wait_for(lambda: (home / "state.db-wal").exists() and (home / "logs" / "w1").exists(), 10, what="state files")
    assert {p: mode(home / p) for p in (".", "state.db", "state.db-wal", "state.db-shm", "logs", "logs/w1")} == {
        ".": "0o700",
        "state.db": "0o600",
        "state.db-wal": "0o600",
        "state.db-shm": "0o600",
        "logs": "0o700",
        "logs/w1": "0o700",
    }
    assert mode(tmp_path / "fresh") == "0o700"  # created for the home, so ours
    assert (mode(snapshot.parent), mode(snapshot)) == ("0o700", "0o600")


def test_bad_token_files_are_one_line_naming_the_path(tmp_path: Path) -> None:
    good = secret_file(tmp_path / "admin", "s3cret-value\n")
    empty = secret_file(tmp_path / "empty", " \n")
    missing = str(tmp_path / "nope")
    cases = [
        (["models", "--admin-token", "s3cret-value", "--admin-token-file", good], "not both"),
        (["models", "--admin-token-file", missing], f"cannot read token file {missing}"),
        (["models", "--admin-token-file", empty], f"token file {empty} is empty"),
        (["controller", "--join-token-file", missing, "--port", str(free_port())], missing),
        (["worker", "--join-token-file", empty, "--port", str(free_port())], empty),
        (["gateway", "--admin-token-file", missing, "--port", str(free_port())], missing),
    ]
    for args, expected in cases:
        r = (
            run_cli(*args, "--controller", "http://127.0.0.1:9")
            if args[0] in ("models", "worker", "gateway")
            else run_cli(*args)
        )
        assert r.returncode != 0, (args, r.stdout)
        out = " ".join((r.stdout + r.stderr).split())  # rich may wrap a long path
        assert expected in out, (args, out)
        assert "s3cret-value" not in out and "Traceback" not in out, out
    gw = subprocess.run(
        [sys.executable, "-m", "modelfleet.gateway", "--admin-token-file", missing],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gw.returncode != 0 and f"cannot read token file {missing}" in gw.stderr and "Traceback" not in gw.stderr


def test_resolve_token_and_private_dir(tmp_path: Path) -> None:
    f = secret_file(tmp_path / "t", "\t tok \r\n")
    assert resolve_token(None, f, "admin") == "tok"
    assert resolve_token("direct", None, "admin") == "direct"
    assert resolve_token(None, None, "admin") is None
    with pytest.raises(SecretFileError, match="not both"):
        resolve_token("direct", f, "admin")
    (tmp_path / "dir").mkdir()
    with pytest.raises(SecretFileError, match="cannot read token file"):
        resolve_token(None, str(tmp_path / "dir"), "join")  # a folder is not a file
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    private_dir(existing / "a" / "b")
    assert [mode(p) for p in (existing, existing / "a", existing / "a" / "b")] == ["0o755", "0o700", "0o700"]
