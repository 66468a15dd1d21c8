"""Private store servers on free ports, for tests that stop, restart or wipe their store.

The shared servers (PostgreSQL 5432, MariaDB 3306, Redis 6379) are never touched. Each class
has ``url``, ``start()``, ``stop()`` (a clean stop, as an operator's restart does) and
``destroy()`` (stop and delete the data); ``private_store_or_skip(kind)`` starts one.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tests.conftest import IN_CI, free_port, port_open
from tests.support.pgserver import PrivatePostgres


class _Daemon:
    """A server process we run in the foreground (so its pid is ours to stop)."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"mf-{self.name}-"))
        self.popen: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.dir / f"{self.name}.log", "ab")
        self.popen = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.05)

    def answers(self) -> bool:
        return port_open("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / f"{self.name}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class PrivateRedis(_Daemon):
    """``redis-server`` with AOF (``durable=True``: a restart keeps everything) or with no
    persistence at all (a restart loses everything, as a cache-configured Redis does)."""

    name = "redis"

    def __init__(self, durable: bool = True, *extra: str) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server not found")
        super().__init__()
        self.durable, self.extra = durable, extra

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.durable else "no",
            "--daemonize",
            "no",
            *self.extra,
        ]

    def answers(self) -> bool:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix=mf"


class PrivateMariaDB(_Daemon):
    """``mariadb-install-db`` + ``mariadbd`` in a temp dir; database ``modelfleet``, root without password."""

    name = "mariadb"

    def __init__(self) -> None:
        if shutil.which("mariadb-install-db") is None or not Path("/usr/sbin/mariadbd").exists():
            raise RuntimeError("mariadb-install-db / mariadbd not found")
        super().__init__()
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.dir / 'data'}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self._created = False

    def command(self) -> list[str]:
        return [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={self.dir / 'data'}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.dir / 'mysqld.sock'}",
            "--user=root",
            f"--pid-file={self.dir / 'mysqld.pid'}",
            "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=2",
            "--skip-name-resolve",
        ]

    def answers(self) -> bool:
        import pymysql

        try:
            pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", connect_timeout=1).close()
            return True
        except pymysql.MySQLError:
            return False

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        if not self._created:
            import pymysql

            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", autocommit=True)
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS modelfleet")
            conn.close()
            self._created = True

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/modelfleet"


PrivateStore = PrivatePostgres | PrivateMariaDB | PrivateRedis
_SERVERS = {"postgresql": PrivatePostgres, "mariadb": PrivateMariaDB, "redis": PrivateRedis}


def private_store_or_skip(kind: str, *args: object, prepared: Future[PrivateStore] | None = None) -> PrivateStore:
    """A started private server of ``kind`` (postgresql, mariadb, redis); skips (fails in CI)
    when this machine cannot run one. ``prepared``: one whose data directory is being created
    in the background already (``initdb`` and ``mariadb-install-db`` take seconds)."""
    import pytest

    server = None
    try:
        server = prepared.result() if prepared is not None else _SERVERS[kind](*args)  # type: ignore[arg-type]
        server.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        if server is not None:
            server.destroy()
        if IN_CI:
            pytest.fail(f"cannot run a private {kind} server: {exc}")
        pytest.skip(f"cannot run a private {kind} server: {exc}")
    return server


@contextlib.contextmanager
def prepared_stores(*kinds: str) -> Iterator[dict[str, Future[PrivateStore]]]:
    """Create the data directories of private servers of ``kinds`` in the background while
    other tests run; every one is destroyed at the end, started or not."""
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        futures = {kind: pool.submit(_SERVERS[kind]) for kind in kinds}
        try:
            yield futures
        finally:
            for future in futures.values():
                with contextlib.suppress(Exception):
                    future.result().destroy()
