"""A private PostgreSQL server on a free port, for tests that stop and start their store.

The shared server on 5432 is never touched. Runs as the `postgres` user (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import IN_CI, free_port


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    def __init__(self) -> None:
        binaries = pg_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = binaries
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mf-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                           "--no-sync"], timeout=120)

    def _as_postgres(self, args: list[str], timeout: float = 60) -> None:
        cmd = args if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout, cwd=self.dir)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-w",
                           "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])

    def stop(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def private_postgres_or_skip():
    import pytest

    try:
        pg = PrivatePostgres()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        if IN_CI:
            pytest.fail(f"cannot run a private PostgreSQL server: {exc}")
        pytest.skip(f"cannot run a private PostgreSQL server: {exc}")
    pg.start()
    time.sleep(0.2)
    return pg
