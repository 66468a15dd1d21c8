"""Shared fixtures: real PostgreSQL, MariaDB and Redis on localhost.

In CI (CI=true) a missing server fails the test; elsewhere the test skips with a line
saying why. Each test session gets its own database (PostgreSQL/MariaDB) or key prefix
(Redis), so parallel runs and helpers never see each other's rows."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

IN_CI = os.environ.get("CI") == "true"
PG_HOST, PG_PORT = "127.0.0.1", 5432
MY_HOST, MY_PORT = "127.0.0.1", 3306
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if port_open(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{msg} and CI=true: scripts/services.sh should have started it")
    pytest.skip(f"{msg}; start it (scripts/services.sh) to run this test")


def require_modules(*modules: str, hint: str) -> None:
    """Module-level: skip a test file whose backend package is missing, but fail in CI, where
    `make test` installs every backend (a broken install must not pass as skipped tests)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]  # find_spec: no slow import
    if not missing:
        return
    msg = f"{', '.join(missing)} not installed ({hint})"
    if IN_CI:
        pytest.fail(f"{msg} and CI=true", pytrace=False)
    pytest.skip(msg, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unique_name() -> str:
    return "mf_" + uuid.uuid4().hex[:12]


@pytest.fixture
def pg_url(unique_name: str):
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    with psycopg.connect(f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{unique_name}"')
    yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{unique_name}"
    with psycopg.connect(f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{unique_name}" WITH (FORCE)')


@pytest.fixture
def mysql_url(unique_name: str):
    """A fresh MariaDB database for one test, dropped afterwards."""
    require_service("MariaDB", MY_HOST, MY_PORT)
    import pymysql

    conn = pymysql.connect(host=MY_HOST, port=MY_PORT, user="root", password="", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{unique_name}`")
    yield f"mysql://root@{MY_HOST}:{MY_PORT}/{unique_name}"
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{unique_name}`")
    conn.close()


@pytest.fixture
def redis_url(unique_name: str):
    """A Redis URL whose key prefix is private to this test; its keys are deleted afterwards."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={unique_name}"
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    for k in r.scan_iter(f"{unique_name}:*"):
        r.delete(k)
    r.close()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def procs(tmp_path):
    """Real modelfleet subprocesses, all stopped (with their process groups) at teardown."""
    from tests.support.procs import Procs

    p = Procs(tmp_path)
    yield p
    p.stop_all()
