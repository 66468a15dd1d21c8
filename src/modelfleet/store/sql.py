"""SQL store: SQLite (embedded default), PostgreSQL, MySQL/MariaDB, on SQLAlchemy 2 async.

How the contract in base.py is kept here:

- Clock (principle 4): every time that matters is the database's own clock, written and
  compared inside the SQL (``_NOW`` per dialect); ``heartbeat_age`` is computed in the SELECT.
  Times are DOUBLE epoch seconds, the one representation the three dialects all subtract alike.
- Atomic writes (principle 5): upserts (``ON CONFLICT`` / ``ON DUPLICATE KEY UPDATE``), and the
  multi-statement operations run in one transaction. SQLite transactions start with
  ``BEGIN IMMEDIATE`` so two processes on one file queue on the write lock instead of failing
  a read-to-write lock upgrade.
- Cheap heartbeats: on PostgreSQL a heartbeat without instance changes is one statement in
  autocommit mode (a data-modifying CTE does the upsert, the revision bump on registration and
  the revision read). MySQL has no RETURNING, so it needs upsert + read + COMMIT.
- Liveness across outages: ``liveness.paused`` is the time the store took no heartbeat
  (``record_outage``); each heartbeat writes ``live_at`` = store now - paused, and the age is
  (store now - paused) - live_at, so a store that comes back does not age every worker.
- Schema only through Alembic (``migrations/``), applied by ``migrate()`` under a lock.
- Errors: unreachable / timed out / lost connection -> StoreUnavailable; a URL that can never
  work (unknown host, failed authentication, unknown database) -> StoreConfigError. Messages
  name only scheme and host:port (``describe_url``), never the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from modelfleet.config import private_dir
from modelfleet.models import (
    ApiKey,
    AutoscaleStatus,
    Deployment,
    Instance,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    Lease,
    LoadReport,
    WorkerInfo,
    WorkerRecord,
)
from modelfleet.store import describe_url
from modelfleet.store.base import (
    AUTH_OPENED,
    AUTH_REQUIRED,
    SPEC_FIELDS,
    ClusterMeta,
    HeartbeatResult,
    Store,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "modelfleet_schema_version"
# pg_advisory_xact_lock key for migrate(): any constant; advisory locks are per database.
PG_MIGRATE_LOCK = 0x6D66_6D69_6772  # "mfmigr"
MIGRATE_LOCK_WAIT_S = 60

# The database's clock in epoch seconds, as a DOUBLE. SQLite 3.40 (this platform) has no
# unixepoch('subsec'), so the Julian-day form; SQLite keeps 'now' fixed within a statement.
# MySQL's NOW(6) is fixed within a statement; the connection runs with time_zone '+00:00'
# so UNIX_TIMESTAMP(NOW(6)) is exact even across a DST change.
_NOW = {
    "postgresql": "CAST(extract(epoch FROM clock_timestamp()) AS double precision)",
    "mysql": "(UNIX_TIMESTAMP(NOW(6)) + 0e0)",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
_GREATEST = {"postgresql": "GREATEST", "mysql": "GREATEST", "sqlite": "max"}

_DRIVERS = {
    "sqlite": ("sqlite+aiosqlite", "sqlite"),
    "postgresql": ("postgresql+psycopg", "postgresql+psycopg"),
    "postgres": ("postgresql+psycopg", "postgresql+psycopg"),
    "mysql": ("mysql+aiomysql", "mysql+pymysql"),
    "mariadb": ("mysql+aiomysql", "mysql+pymysql"),
}

_INSTANCE_COLUMNS = (
    "id",
    "model",
    "deployment",
    "worker_id",
    "backend",
    "source",
    "params",
    "weight",
    "max_concurrency",
    "enabled",
    "pending_reason",
    "state",
    "endpoint",
    "restarts",
    "last_error",
    "updated_at",
)
_OBSERVED = ("state", "endpoint", "restarts", "last_error")
_WORKER_COLUMNS = "id, name, address, port, labels, resources, version, last_heartbeat, registered_at"


@cache
def head_revision() -> str:
    """The newest Alembic revision shipped with this package."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None
    return head


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _loads(value: Any) -> Any:
    # PostgreSQL's json columns come back parsed (by orjson, see _install_ping_hooks); MySQL
    # and SQLite hand back the text.
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class SQLStore(Store):
    """One engine (connection pool) per store; safe for concurrent use from one event loop."""

    url_scheme = "sql"

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        op_timeout: float = 15.0,
        pool_size: int = 20,
        max_overflow: int = 0,
        ping_idle_s: float = 1.0,
    ) -> None:
        self._desc = describe_url(url)
        scheme = urlsplit(url).scheme.split("+")[0].lower()
        if scheme not in _DRIVERS:
            raise StoreConfigError(f"{self._desc}: not a SQL store URL")
        try:
            base = make_url(url)
        except Exception as exc:  # sqlalchemy.exc.ArgumentError: unparseable URL
            raise StoreConfigError(f"{self._desc}: malformed store URL") from exc
        async_driver, sync_driver = _DRIVERS[scheme]
        self.dialect = "postgresql" if scheme.startswith("postgres") else async_driver.split("+")[0]
        self.url_scheme = self.dialect
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        self._async_url = base.set(drivername=async_driver)
        self._sync_url = base.set(drivername=sync_driver)
        self._sqlite_path: Path | None = None
        if self.dialect == "sqlite":
            if not base.database or base.database == ":memory:" or base.database.startswith("file:"):
                raise StoreConfigError(f"{self._desc}: give SQLite a file path (use memory:// for tests)")
            self._sqlite_path = Path(base.database).expanduser()

        engine_kw: dict[str, Any] = {"connect_args": self._connect_args(base)}
        if self.dialect == "sqlite":
            engine_kw.update(pool_size=5, max_overflow=5, pool_timeout=op_timeout)
        else:
            # A fixed pool and no overflow: under a burst, callers queue for a connection
            # instead of opening and closing extra ones (a connect costs more than a heartbeat).
            # Pre-ping is ours (see _install_ping_hooks), not pool_pre_ping.
            engine_kw.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=op_timeout)
        if self.dialect == "mysql":
            # READ COMMITTED: no gap locks on the upserts, so concurrent registrations do not
            # deadlock on InnoDB next-key locks; every write here is a single-row upsert or a
            # short transaction that does not need repeatable reads.
            engine_kw["isolation_level"] = "READ COMMITTED"
        self._engine: AsyncEngine = create_async_engine(self._async_url, **engine_kw)
        if self.dialect == "sqlite":
            self._install_sqlite_hooks(self._engine.sync_engine)
        else:
            _install_ping_hooks(self._engine.sync_engine, ping_idle_s)
        # Single statements and reads on PostgreSQL run in autocommit: no BEGIN/COMMIT round
        # trips (psycopg switches autocommit client-side, no query). MySQL would pay a
        # SET autocommit round trip per toggle, so it keeps implicit transactions + COMMIT.
        if self.dialect == "postgresql":
            self._single: AsyncEngine = self._engine.execution_options(isolation_level="AUTOCOMMIT")
            self._reader: AsyncEngine = self._single
        elif self.dialect == "sqlite":
            self._single = self._engine
            self._reader = self._engine.execution_options(modelfleet_begin="BEGIN DEFERRED")
        else:
            self._single = self._engine
            self._reader = self._engine
        # SQLite has one writer at a time per file; queueing this process's writers here keeps
        # them off SQLite's busy-wait (which sleeps up to 100 ms per retry).
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._sql = self._statements()
        # The same statements in the driver's own paramstyle, for _raw_fetchone.
        self._raw = {"heartbeat": _pyformat(self._sql["heartbeat"].text)} if self.dialect == "postgresql" else {}

    # -- setup ---------------------------------------------------------------------
    def _connect_args(self, url: URL) -> dict[str, Any]:
        q = url.query
        if self.dialect == "postgresql":
            args: dict[str, Any] = {"application_name": "modelfleet"}
            if "connect_timeout" not in q:
                args["connect_timeout"] = max(2, round(self._connect_timeout))
            return args
        if self.dialect == "mysql":
            args = {"init_command": "SET time_zone = '+00:00'"}
            if "connect_timeout" not in q:
                args["connect_timeout"] = self._connect_timeout
            if "charset" not in q:
                args["charset"] = "utf8mb4"
            return args
        # sqlite3's timeout is its busy timeout: how long a writer waits for another
        # process's write transaction before "database is locked".
        return {"timeout": 30.0}

    def _install_sqlite_hooks(self, engine: sa.Engine) -> None:
        path = self._sqlite_path
        assert path is not None

        @event.listens_for(engine, "do_connect")
        def _mkdir(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
            try:
                private_dir(path.parent)
            except OSError as exc:
                raise StoreConfigError(f"{self._desc}: cannot create the database's directory") from exc
            # The database holds key hashes: created 0600 here, before SQLite would create it
            # 0644; SQLite gives its -wal and -shm files the database file's mode.
            with contextlib.suppress(OSError):  # exists already; or SQLite will say why it cannot
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, conn_rec: Any) -> None:
            # Take BEGIN away from sqlite3 (it would emit a DEFERRED one lazily) so that the
            # "begin" hook below decides the kind of transaction.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # WAL is switched on by migrate() (see _enable_wal). NORMAL: in WAL mode a crash can
            # lose the last commits before a checkpoint, never corrupt the file.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql(conn.get_execution_options().get("modelfleet_begin", "BEGIN IMMEDIATE"))

    def _statements(self) -> dict[str, sa.TextClause]:
        now = _NOW[self.dialect]
        greatest = _GREATEST[self.dialect]
        d = self.dialect
        # The liveness clock: store time minus the time during which the store took no heartbeat.
        paused = "(SELECT paused FROM liveness WHERE id = 1)"
        live_now = f"({now} - {paused})"
        cols = ", ".join(_INSTANCE_COLUMNS)
        vals = ", ".join(f":{c}" if c != "updated_at" else now for c in _INSTANCE_COLUMNS)
        s: dict[str, str] = {
            "now": f"SELECT {now}",
            "revision": "SELECT rev FROM revision WHERE id = 1",
            "advance": "UPDATE revision SET rev = :n WHERE id = 1 AND rev < :n",
            "workers": f"SELECT {_WORKER_COLUMNS}, {greatest}(0, {live_now} - live_at) AS age "
            "FROM workers ORDER BY id",
            "worker": f"SELECT {_WORKER_COLUMNS}, {greatest}(0, {live_now} - live_at) AS age "
            "FROM workers WHERE id = :id",
            "meta": "SELECT name, value FROM cluster_meta",
            "paused": "SELECT paused FROM liveness WHERE id = 1" + ("" if d == "sqlite" else " FOR UPDATE"),
            "delete_worker": "DELETE FROM workers WHERE id = :id",
            "delete_declared": "DELETE FROM instances WHERE deployment IS NULL AND worker_id IN :ids",
            "delete_unreported": "DELETE FROM instances WHERE worker_id = :wid AND deployment IS NULL "
            "AND id NOT IN :ids",
            # A report about an instance that has since moved to another worker changes nothing.
            "update_observed": f"UPDATE instances SET state = :state, endpoint = :endpoint, "
            f"restarts = :restarts, last_error = :last_error, updated_at = {now} "
            "WHERE id = :id AND worker_id = :worker_id",
            "insert_instance": f"INSERT INTO instances ({cols}) VALUES ({vals})",
            "instance": f"SELECT {cols} FROM instances WHERE id = :id",
            "delete_instance": "DELETE FROM instances WHERE id = :id",
            "deployment": "SELECT body, created_at, updated_at FROM deployments WHERE name = :name",
            "deployments": "SELECT body, created_at, updated_at FROM deployments ORDER BY name",
            "delete_deployment": "DELETE FROM deployments WHERE name = :name",
            "get_lease": f"SELECT holder, token, expires_at - {now} AS left_s FROM leases "
            f"WHERE name = :name AND expires_at > {now}",
            "lease_row": "SELECT holder, token FROM leases WHERE name = :name",
            "release_lease": f"UPDATE leases SET expires_at = {now} WHERE name = :name AND holder = :holder",
            "insert_key": f"INSERT INTO api_keys (id, name, secret_hash, created_at, revoked) "
            f"VALUES (:id, :name, :secret_hash, {now}, :revoked)",
            "key": "SELECT id, name, secret_hash, created_at, revoked FROM api_keys WHERE id = :id",
            "keys": "SELECT id, name, secret_hash, created_at, revoked FROM api_keys ORDER BY id",
            "revoke_key": "UPDATE api_keys SET revoked = :revoked WHERE id = :id",
            "schema_version": f"SELECT version_num FROM {VERSION_TABLE}",
            "load_reports": f"SELECT body, expires_at - {now} AS left_s FROM load_reports WHERE expires_at > {now}",
            "gc_load_reports": f"DELETE FROM load_reports WHERE expires_at <= {now}",
        }
        if d == "mysql":
            s["put_load_report"] = (
                f"INSERT INTO load_reports (source, body, expires_at) VALUES (:source, :body, {now} + :ttl) "
                f"ON DUPLICATE KEY UPDATE body = :body, expires_at = {now} + :ttl"
            )
        else:
            s["put_load_report"] = (
                f"INSERT INTO load_reports (source, body, expires_at) VALUES (:source, :body, {now} + :ttl) "
                "ON CONFLICT (source) DO UPDATE SET body = excluded.body, expires_at = excluded.expires_at"
            )
        worker_vals = f"(:id, :name, :address, :port, :labels, :resources, :version, {now}, {now}, 1, {live_now})"
        worker_cols = (
            "(id, name, address, port, labels, resources, version, last_heartbeat, registered_at, beats, live_at)"
        )
        # No heartbeat landed between the latest one (or the end of the last recorded outage)
        # and now: that time is paused. All SET terms read the old row (MySQL assigns left to
        # right, and paused is assigned before paused_until).
        outage_gap = (
            f"{greatest}(0, {{t}} - {greatest}(paused_until, "
            "COALESCE((SELECT MAX(last_heartbeat) FROM workers), {t})))"
        )
        if d == "postgresql":
            # clock_timestamp() moves within a statement: read it once.
            s["record_outage"] = (
                f"UPDATE liveness SET paused = paused + {outage_gap.format(t='c.t')}, "
                f"paused_until = GREATEST(paused_until, c.t) FROM (SELECT {now} AS t) AS c WHERE liveness.id = 1"
            )
            s["set_meta"] = (
                "INSERT INTO cluster_meta (name, value) VALUES (:name, :value) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
            )
        else:
            s["record_outage"] = (
                f"UPDATE liveness SET paused = paused + {outage_gap.format(t=now)}, "
                f"paused_until = {greatest}(paused_until, {now}) WHERE id = 1"
            )
            s["set_meta"] = (
                "INSERT INTO cluster_meta (name, value) VALUES (:name, :value) "
                + ("ON DUPLICATE KEY UPDATE value = :value" if d == "mysql"
                   else "ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            )
        if d == "mysql":
            s["bump"] = "UPDATE revision SET rev = LAST_INSERT_ID(rev + :n) WHERE id = 1"
            # Assignments in ON DUPLICATE KEY UPDATE repeat the bind parameters instead of
            # VALUES(col), which MySQL 8 deprecates and MariaDB keeps; both accept this.
            s["heartbeat"] = (
                f"INSERT INTO workers {worker_cols} VALUES {worker_vals} ON DUPLICATE KEY UPDATE "
                "name = :name, address = :address, port = :port, labels = :labels, "
                f"resources = :resources, version = :version, last_heartbeat = {now}, beats = beats + 1, "
                f"live_at = {live_now}"
            )
            # No WHERE on ON DUPLICATE KEY UPDATE: each term keeps the old value unless the row
            # is this worker's (worker_id itself is never assigned here, so the test is stable).
            mine = "worker_id = :worker_id"
            s["upsert_declared"] = (
                f"INSERT INTO instances ({cols}) VALUES ({vals}) ON DUPLICATE KEY UPDATE "
                f"state = IF({mine}, :state, state), endpoint = IF({mine}, :endpoint, endpoint), "
                f"restarts = IF({mine}, :restarts, restarts), last_error = IF({mine}, :last_error, last_error), "
                f"updated_at = IF({mine}, {now}, updated_at)"
            )
            s["put_deployment"] = (
                "INSERT INTO deployments (name, body, created_at, updated_at) "
                f"VALUES (:name, :body, {now}, {now}) "
                f"ON DUPLICATE KEY UPDATE body = :body, updated_at = {now}"
            )
            # ON DUPLICATE KEY UPDATE assigns left to right and later terms see earlier ones,
            # so the order matters: token and holder read the old holder/expiry; expires_at
            # reads the new holder (ours exactly when we took or renewed the lease).
            s["acquire_lease"] = (
                f"INSERT INTO leases (name, holder, token, expires_at) VALUES (:name, :holder, 1, {now} + :ttl) "
                "ON DUPLICATE KEY UPDATE "
                f"token = IF(holder = :holder OR expires_at <= {now}, "
                f"IF(expires_at > {now}, token, token + 1), token), "
                f"holder = IF(holder = :holder OR expires_at <= {now}, :holder, holder), "
                f"expires_at = IF(holder = :holder, {now} + :ttl, expires_at)"
            )
            # Locking read on the live_at index: only the dead rows are locked, so a
            # heartbeat of a live worker never waits for the GC.
            s["dead_workers"] = f"SELECT id FROM workers WHERE live_at < {live_now} - :older ORDER BY id FOR UPDATE"
            s["delete_dead"] = f"DELETE FROM workers WHERE id IN :ids AND live_at < {live_now} - :older"
        else:
            s["bump"] = "UPDATE revision SET rev = rev + :n WHERE id = 1 RETURNING rev"
            pg = d == "postgresql"
            labels = "CAST(:labels AS json)" if pg else ":labels"
            resources = "CAST(:resources AS json)" if pg else ":resources"
            # PostgreSQL's clock_timestamp() moves within a statement: read it once (a CTE
            # with a volatile function is evaluated once) so that a new worker's registered_at
            # equals its last_heartbeat. SQLite's 'now' is fixed per statement already.
            row = (
                f"SELECT :id, :name, :address, :port, {labels}, {resources}, :version, t, t, 1, t - p FROM clock"
                if pg
                else f"VALUES {worker_vals}"
            )
            upsert = (
                f"INSERT INTO workers {worker_cols} {row} "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, address = excluded.address, "
                "port = excluded.port, labels = excluded.labels, resources = excluded.resources, "
                "version = excluded.version, last_heartbeat = excluded.last_heartbeat, "
                "live_at = excluded.live_at, beats = workers.beats + 1 "
            )
            if pg:
                # One statement, one round trip: upsert, bump the revision only when the row
                # was inserted (beats = 1), and read the revision. The outer SELECT sees the
                # revision row as of the statement's snapshot, so it takes the bumped value
                # from the CTE when there is one.
                s["heartbeat"] = (
                    f"WITH clock AS (SELECT {now} AS t, {paused} AS p), "
                    f"up AS ({upsert} RETURNING beats = 1 AS registered), "
                    "bump AS (UPDATE revision SET rev = rev + 1 WHERE id = 1 "
                    "AND (SELECT registered FROM up) RETURNING rev) "
                    "SELECT (SELECT registered FROM up) AS registered, "
                    "COALESCE((SELECT rev FROM bump), (SELECT rev FROM revision WHERE id = 1)) AS rev"
                )
                # Age test and delete in one statement: a row a concurrent heartbeat updated
                # is re-checked after its lock is released (EvalPlanQual) and survives.
                s["delete_dead_pg"] = (
                    f"WITH dead AS (DELETE FROM workers WHERE live_at < {live_now} - :older RETURNING id), "
                    "gone AS (DELETE FROM instances WHERE deployment IS NULL "
                    "AND worker_id IN (SELECT id FROM dead)), "
                    "bump AS (UPDATE revision SET rev = rev + (SELECT count(*) FROM dead) WHERE id = 1 "
                    "AND EXISTS (SELECT 1 FROM dead)) "
                    "SELECT id FROM dead ORDER BY id"
                )
            else:
                s["heartbeat"] = f"{upsert} RETURNING beats"
                s["delete_dead"] = f"DELETE FROM workers WHERE live_at < {live_now} - :older RETURNING id"
            params = "CAST(:params AS json)" if pg else ":params"
            ivals = vals.replace(":params", params)
            s["insert_instance"] = f"INSERT INTO instances ({cols}) VALUES ({ivals})"
            s["upsert_declared"] = (
                f"INSERT INTO instances ({cols}) VALUES ({ivals}) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, endpoint = excluded.endpoint, restarts = excluded.restarts, "
                "last_error = excluded.last_error, updated_at = excluded.updated_at "
                "WHERE instances.worker_id = excluded.worker_id"
            )
            # clock_timestamp() moves within a PostgreSQL statement: read it once so that a new
            # deployment has created_at == updated_at exactly.
            source = (
                f"SELECT :name, CAST(:body AS json), t, t FROM (SELECT {now} AS t) AS c"
                if pg
                else f"VALUES (:name, :body, {now}, {now})"
            )
            s["put_deployment"] = (
                f"INSERT INTO deployments (name, body, created_at, updated_at) {source} "
                "ON CONFLICT (name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at"
            )
            # PostgreSQL's clock_timestamp() moves within a statement, so "now" is taken once,
            # in the inserted row, and read back as excluded.expires_at - :ttl. SET terms all
            # see the old row. No row comes back when the WHERE refuses the update: someone
            # else holds an unexpired lease.
            s["acquire_lease"] = (
                "INSERT INTO leases (name, holder, token, expires_at) "
                f"VALUES (:name, :holder, 1, {now} + :ttl) ON CONFLICT (name) DO UPDATE SET "
                "token = CASE WHEN leases.expires_at > excluded.expires_at - :ttl "
                "THEN leases.token ELSE leases.token + 1 END, "
                "holder = excluded.holder, expires_at = excluded.expires_at "
                "WHERE leases.holder = excluded.holder OR leases.expires_at <= excluded.expires_at - :ttl "
                "RETURNING token"
            )
        out = {k: text(v) for k, v in s.items()}
        for key, sql in s.items():
            if ":ids" in sql:  # lists of ids: an expanding IN, which also renders [] correctly
                out[key] = out[key].bindparams(sa.bindparam("ids", expanding=True, type_=sa.String()))
        return out

    # -- running operations ---------------------------------------------------------
    async def _run(
        self,
        engine: AsyncEngine,
        fn: Callable[[AsyncConnection], Awaitable[T]],
        *,
        write: bool,
        repeatable: bool | None = None,
    ) -> T:
        """Run ``fn`` on one connection and commit; translate driver errors; retry deadlocks.

        ``fn`` must be safe to run again: a deadlock or serialization failure rolled the whole
        transaction back, so a retry starts from scratch.

        ``repeatable`` (default: reads) also retries once when the connection turns out to be
        dead, which is what a pooled connection is right after a server restart. Only for
        operations whose second run gives the right answer even if the first one committed
        just before the connection broke (reads, upserts, lease renewals, revision bumps);
        not for create/delete, where it would turn success into "exists"/"not found"."""
        retry_lost = (not write) if repeatable is None else repeatable
        for attempt in range(5):
            try:
                async with asyncio.timeout(self._op_timeout):
                    async with self._writer(write):
                        async with engine.connect() as conn:
                            result = await fn(conn)
                            await conn.commit()
                            return result
            except StoreError:
                raise
            except TimeoutError as exc:
                raise StoreUnavailable(f"{self._desc}: timed out after {self._op_timeout:g}s") from exc
            except Exception as exc:
                if attempt < 4 and _is_retryable(exc):
                    await asyncio.sleep(0.005 * (attempt + 1))
                    continue
                if retry_lost and _connection_lost(exc):
                    # SQLAlchemy has invalidated the pool: the retry gets a new connection.
                    retry_lost = False
                    continue
                raise self._translate(exc) from exc
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _writer(self, write: bool) -> AsyncIterator[None]:
        if write and self._write_lock is not None:
            async with self._write_lock:
                yield
        else:
            yield

    def _translate(self, exc: BaseException) -> StoreError:
        kind, reason = classify_error(exc)
        cls = StoreConfigError if kind == "config" else StoreUnavailable if kind == "unavailable" else StoreError
        return cls(f"{self._desc}: {reason}")

    async def _raw_fetchone(self, key: str, params: dict[str, Any]) -> tuple[Any, ...]:
        """The PostgreSQL heartbeat's hot path: one statement on the psycopg connection itself.

        SQLAlchemy's statement execution (compile cache lookup, result wrapping, greenlet hops)
        costs about as much CPU as the round trip; the pool, the checkout ping and error
        translation are still SQLAlchemy's. Used only for single autocommit statements."""
        import psycopg

        sql = self._raw[key]
        for attempt in range(2):
            broken = False
            try:
                async with asyncio.timeout(self._op_timeout):
                    async with self._single.connect() as conn:
                        driver = (await conn.get_raw_connection()).driver_connection
                        try:
                            cur = await driver.execute(sql, params)
                            row = await cur.fetchone()
                        except BaseException:
                            # A connection left mid-query (timeout) or broken must not go back
                            # to the pool; a broken one means the server likely went away, so
                            # drop the idle ones too and let the next checkouts reconnect.
                            broken = driver.broken
                            if broken or driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                                await conn.invalidate()
                            if broken:
                                await self._engine.dispose()
                            raise
                assert row is not None
                return tuple(row)
            except StoreError:
                raise
            except TimeoutError as exc:
                raise StoreUnavailable(f"{self._desc}: timed out after {self._op_timeout:g}s") from exc
            except Exception as exc:
                # Only the heartbeat comes here, and it is safe to run twice (see _run).
                if broken and attempt == 0:
                    continue
                raise self._translate(exc) from exc
        raise AssertionError("unreachable")

    async def _scalar(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        async def op(conn: AsyncConnection) -> Any:
            return (await conn.execute(self._sql[sql], params or {})).scalar()

        return await self._run(self._reader, op, write=False)

    async def _bump(self, conn: AsyncConnection, n: int = 1) -> int:
        res = await conn.execute(self._sql["bump"], {"n": n})
        if self.dialect == "mysql":
            # UPDATE ... SET rev = LAST_INSERT_ID(rev + n) hands the new value back in the OK
            # packet's insert id: no second query.
            return int(res.lastrowid)
        return int(res.scalar_one())

    # -- lifecycle -----------------------------------------------------------------
    async def migrate(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._migrate_sync), MIGRATE_LOCK_WAIT_S + 30)
        except StoreError:
            raise
        except TimeoutError as exc:
            raise StoreUnavailable(f"{self._desc}: migration timed out") from exc
        except Exception as exc:
            raise self._translate(exc) from exc

    def _migrate_sync(self) -> None:
        from alembic import command

        connect_args = self._connect_args(self._sync_url)
        if self.dialect == "mysql":
            connect_args.pop("init_command", None)
        engine = sa.create_engine(self._sync_url, poolclass=sa.NullPool, connect_args=connect_args)
        if self.dialect == "sqlite":
            self._install_sqlite_hooks(engine)
        try:
            if self.dialect == "mysql":
                # MySQL DDL commits implicitly, so the lock is a named session lock held around
                # the whole upgrade; the name includes the database so tests do not queue.
                with engine.connect() as conn:
                    name = f"modelfleet_migrate:{self._sync_url.database}"[:64]
                    got = conn.execute(text("SELECT GET_LOCK(:n, :w)"), {"n": name, "w": MIGRATE_LOCK_WAIT_S})
                    if got.scalar() != 1:
                        raise StoreUnavailable(f"{self._desc}: another controller holds the migration lock")
                    try:
                        conn.commit()
                        command.upgrade(_alembic_config(conn), "head")
                        conn.commit()
                    finally:
                        conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
                        conn.commit()
            else:
                # One transaction for the whole upgrade. PostgreSQL: a transaction-scoped
                # advisory lock taken first, so a second migrate() waits, then finds the schema
                # at head. SQLite: the transaction is BEGIN IMMEDIATE (hook), which serializes
                # the same way through the file's write lock.
                with engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.execute(text(f"SET LOCAL lock_timeout = '{MIGRATE_LOCK_WAIT_S}s'"))
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATE_LOCK})
                    command.upgrade(_alembic_config(conn), "head")
                if self.dialect == "sqlite":
                    self._enable_wal(engine)
        finally:
            engine.dispose()

    @staticmethod
    def _enable_wal(engine: sa.Engine) -> None:
        """WAL (readers never block the writer), switched on once the file has a schema.

        Not on every connect: two connections switching a brand-new, empty file to WAL at once
        can each believe they hold the write lock (one by the rollback journal's rules, one by
        WAL's), which let two migrate() calls both create the tables. On a file with content
        the switch takes the exclusive lock like any writer, and the mode is stored in the file,
        so every later connection is in WAL without asking."""
        try:
            with engine.connect() as conn:
                # On the driver connection: outside any transaction (a journal-mode change
                # inside one is silently ignored), which SQLAlchemy's autobegin would open.
                conn.connection.dbapi_connection.execute("PRAGMA journal_mode=WAL")  # type: ignore[union-attr]
        except (sa.exc.OperationalError, sqlite3.OperationalError):
            # Busy with another writer: a performance setting, the next migrate() sets it.
            pass

    async def ping(self) -> None:
        async def op(conn: AsyncConnection) -> Any:
            try:
                return (await conn.execute(self._sql["schema_version"])).scalar()
            except sa.exc.DBAPIError as exc:
                if _is_missing_table(exc):
                    raise StoreUnavailable(f"{self._desc}: schema not migrated (run migrate)") from exc
                raise

        version = await self._run(self._reader, op, write=False)
        if version != head_revision():
            raise StoreUnavailable(f"{self._desc}: schema at {version!r}, expected {head_revision()!r}")

    async def now(self) -> float:
        return float(await self._scalar("now"))

    async def close(self) -> None:
        await self._engine.dispose()

    # -- workers -------------------------------------------------------------------
    async def heartbeat(self, worker: WorkerInfo, statuses: list[InstanceStatus] | None = None) -> HeartbeatResult:
        params = {
            "id": worker.id,
            "name": worker.name,
            "address": worker.address,
            "port": worker.port,
            "labels": _dumps(worker.labels),
            "resources": worker.resources.model_dump_json(),
            "version": worker.version,
        }
        status_rows = self._status_rows(worker.id, statuses) if statuses is not None else None

        async def op(conn: AsyncConnection) -> HeartbeatResult:
            registered, rev = await self._upsert_worker(conn, params)
            if status_rows is not None:
                declared, observed, reported = status_rows
                if declared:
                    await conn.execute(self._sql["upsert_declared"], declared)
                if observed:
                    await conn.execute(self._sql["update_observed"], observed)
                await conn.execute(self._sql["delete_unreported"], {"wid": worker.id, "ids": reported})
                rev = await self._bump(conn)
            return HeartbeatResult(registered=registered, revision=rev)

        if statuses is None and self.dialect == "postgresql":
            registered, rev = await self._raw_fetchone("heartbeat", params)
            return HeartbeatResult(registered=bool(registered), revision=int(rev))
        engine = self._single if statuses is None else self._engine
        return await self._run(engine, op, write=True, repeatable=True)

    async def _upsert_worker(self, conn: AsyncConnection, params: dict[str, Any]) -> tuple[bool, int]:
        if self.dialect == "postgresql":
            row = (await conn.execute(self._sql["heartbeat"], params)).one()
            return bool(row.registered), int(row.rev)
        res = await conn.execute(self._sql["heartbeat"], params)
        if self.dialect == "mysql":
            # Affected rows: 1 = inserted, 2 = updated (beats always changes the row).
            registered = res.rowcount == 1
        else:
            registered = int(res.scalar_one()) == 1
        if registered:
            return True, await self._bump(conn)
        return False, int((await conn.execute(self._sql["revision"])).scalar_one())

    @staticmethod
    def _status_rows(
        worker_id: str, statuses: list[InstanceStatus]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """Split a worker's report into upserts of its own (declared) instances and
        observed-field updates of instances the store assigned to it."""
        declared: list[dict[str, Any]] = []
        observed: list[dict[str, Any]] = []
        for st in statuses:
            obs = {
                "id": st.id,
                "worker_id": worker_id,
                "state": InstanceState(st.state).value,
                "endpoint": st.endpoint,
                "restarts": st.restarts,
                "last_error": st.last_error,
            }
            if st.declared and st.model:
                # Inserted with these values when new; when the id exists (and is this
                # worker's) only the observed fields change, as in memory.py.
                inst = Instance(
                    id=st.id,
                    model=st.model,
                    worker_id=worker_id,
                    backend=st.backend or "",
                    source=st.source or "",
                    max_concurrency=st.max_concurrency or 4,
                )
                row = _instance_params(inst)
                row.update(obs)
                declared.append(row)
            else:
                observed.append(obs)
        return declared, observed, [st.id for st in statuses]

    async def list_workers(self) -> list[WorkerRecord]:
        async def op(conn: AsyncConnection) -> list[WorkerRecord]:
            return [_worker(r) for r in await conn.execute(self._sql["workers"])]

        return await self._run(self._reader, op, write=False)

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        async def op(conn: AsyncConnection) -> WorkerRecord | None:
            row = (await conn.execute(self._sql["worker"], {"id": worker_id})).first()
            return _worker(row) if row else None

        return await self._run(self._reader, op, write=False)

    async def delete_worker(self, worker_id: str) -> bool:
        async def op(conn: AsyncConnection) -> bool:
            if (await conn.execute(self._sql["delete_worker"], {"id": worker_id})).rowcount == 0:
                return False
            await conn.execute(self._sql["delete_declared"], {"ids": [worker_id]})
            await self._bump(conn)
            return True

        return await self._run(self._engine, op, write=True)

    async def delete_dead_workers(self, older_than: float) -> list[str]:
        older = float(older_than)

        async def op(conn: AsyncConnection) -> list[str]:
            if self.dialect == "postgresql":
                return [r.id for r in await conn.execute(self._sql["delete_dead_pg"], {"older": older})]
            if self.dialect == "mysql":
                ids = [r.id for r in await conn.execute(self._sql["dead_workers"], {"older": older})]
                if ids:
                    await conn.execute(self._sql["delete_dead"], {"ids": ids, "older": older})
            else:
                ids = sorted(r.id for r in await conn.execute(self._sql["delete_dead"], {"older": older}))
            if ids:
                await conn.execute(self._sql["delete_declared"], {"ids": ids})
                await self._bump(conn, len(ids))
            return ids

        engine = self._single if self.dialect == "postgresql" else self._engine
        return await self._run(engine, op, write=True)

    # -- instances -----------------------------------------------------------------
    async def create_instance(self, spec: InstanceSpec) -> Instance:
        params = _instance_params(Instance(**spec.model_dump()))

        async def op(conn: AsyncConnection) -> Instance:
            try:
                await conn.execute(self._sql["insert_instance"], params)
            except sa.exc.IntegrityError as exc:
                raise StoreError(f"instance {spec.id} exists") from exc
            await self._bump(conn)
            return _instance((await conn.execute(self._sql["instance"], {"id": spec.id})).one())

        return await self._run(self._engine, op, write=True)

    async def get_instance(self, instance_id: str) -> Instance | None:
        async def op(conn: AsyncConnection) -> Instance | None:
            row = (await conn.execute(self._sql["instance"], {"id": instance_id})).first()
            return _instance(row) if row else None

        return await self._run(self._reader, op, write=False)

    async def list_instances(self, *, worker_id: str | None = None, model: str | None = None) -> list[Instance]:
        where, params = [], {}
        if worker_id is not None:
            where.append("worker_id = :worker_id")
            params["worker_id"] = worker_id
        if model is not None:
            where.append("model = :model")
            params["model"] = model
        sql = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances"
        if where:
            sql += " WHERE " + " AND ".join(where)
        stmt = text(sql + " ORDER BY id")

        async def op(conn: AsyncConnection) -> list[Instance]:
            return [_instance(r) for r in await conn.execute(stmt, params)]

        return await self._run(self._reader, op, write=False)

    async def update_instance(self, instance_id: str, **fields: object) -> Instance | None:
        allowed = SPEC_FIELDS | {"state", "last_error"}
        for k in fields:
            if k not in allowed:
                raise StoreError(f"field {k} cannot be updated")
        values: dict[str, Any] = {}
        for k, v in fields.items():
            if k == "params":
                values[k] = _dumps(v)
            elif k == "state":
                values[k] = InstanceState(v).value  # type: ignore[arg-type]
            elif k == "enabled":
                values[k] = bool(v)
            else:
                values[k] = v
        now = _NOW[self.dialect]
        sets = []
        for k in sorted(values):
            cast = k == "params" and self.dialect == "postgresql"
            sets.append(f"{k} = CAST(:{k} AS json)" if cast else f"{k} = :{k}")
        sets.append(f"updated_at = {now}")
        stmt = text(f"UPDATE instances SET {', '.join(sets)} WHERE id = :id")
        values["id"] = instance_id

        async def op(conn: AsyncConnection) -> Instance | None:
            if (await conn.execute(stmt, values)).rowcount == 0:
                return None
            await self._bump(conn)
            return _instance((await conn.execute(self._sql["instance"], {"id": instance_id})).one())

        return await self._run(self._engine, op, write=True, repeatable=True)

    async def delete_instance(self, instance_id: str) -> bool:
        async def op(conn: AsyncConnection) -> bool:
            if (await conn.execute(self._sql["delete_instance"], {"id": instance_id})).rowcount == 0:
                return False
            await self._bump(conn)
            return True

        return await self._run(self._engine, op, write=True)

    # -- deployments ---------------------------------------------------------------
    async def put_deployment(self, deployment: Deployment) -> Deployment:
        body = deployment.model_dump_json(exclude={"created_at", "updated_at", "error"})

        async def op(conn: AsyncConnection) -> Deployment:
            await conn.execute(self._sql["put_deployment"], {"name": deployment.name, "body": body})
            await self._bump(conn)
            return _deployment((await conn.execute(self._sql["deployment"], {"name": deployment.name})).one())

        return await self._run(self._engine, op, write=True, repeatable=True)

    async def get_deployment(self, name: str) -> Deployment | None:
        async def op(conn: AsyncConnection) -> Deployment | None:
            row = (await conn.execute(self._sql["deployment"], {"name": name})).first()
            return _deployment(row) if row else None

        return await self._run(self._reader, op, write=False)

    async def list_deployments(self) -> list[Deployment]:
        async def op(conn: AsyncConnection) -> list[Deployment]:
            return [_deployment(r) for r in await conn.execute(self._sql["deployments"])]

        return await self._run(self._reader, op, write=False)

    async def delete_deployment(self, name: str) -> bool:
        async def op(conn: AsyncConnection) -> bool:
            if (await conn.execute(self._sql["delete_deployment"], {"name": name})).rowcount == 0:
                return False
            await self._bump(conn)
            return True

        return await self._run(self._engine, op, write=True)

    async def set_deployment_error(self, name: str, error: str | None) -> bool:
        # One UPDATE that sets a single key of the JSON body, so an operator's change that
        # lands meanwhile is kept. (json, not jsonb, on PostgreSQL: hence the casts.)
        if self.dialect == "postgresql":
            sql = ("UPDATE deployments SET body = CAST(CAST(body AS jsonb) || "
                   "jsonb_build_object('error', CAST(:error AS text)) AS json) WHERE name = :name")
        elif self.dialect == "mysql":
            sql = "UPDATE deployments SET body = JSON_SET(body, '$.error', :error) WHERE name = :name"
        else:
            sql = "UPDATE deployments SET body = json_set(body, '$.error', :error) WHERE name = :name"

        async def op(conn: AsyncConnection) -> bool:
            return (await conn.execute(text(sql), {"name": name, "error": error})).rowcount > 0

        return await self._run(self._engine, op, write=True, repeatable=True)

    async def set_deployment_scale(self, name: str, replicas: int, status: AutoscaleStatus | None) -> bool:
        # Like set_deployment_error: one UPDATE of two keys of the JSON body. MariaDB has no
        # CAST(... AS JSON): there the status goes in as a JSON string (Deployment reads both).
        raw = status.model_dump_json() if status is not None else None
        if self.dialect == "postgresql":
            sql = ("UPDATE deployments SET body = CAST(CAST(body AS jsonb) || jsonb_build_object("
                   "'replicas', CAST(:replicas AS integer), 'autoscale_status', CAST(:status AS jsonb)) AS json) "
                   "WHERE name = :name")
        elif self.dialect == "mysql":
            sql = ("UPDATE deployments SET body = JSON_SET(body, '$.replicas', :replicas, '$.autoscale_status', "
                   ":status) WHERE name = :name")
        else:
            sql = ("UPDATE deployments SET body = json_set(body, '$.replicas', :replicas, '$.autoscale_status', "
                   "json(:status)) WHERE name = :name")

        async def op(conn: AsyncConnection) -> bool:
            params = {"name": name, "replicas": int(replicas), "status": raw}
            return (await conn.execute(text(sql), params)).rowcount > 0

        return await self._run(self._engine, op, write=True, repeatable=True)

    # -- load reports ----------------------------------------------------------------
    async def put_load_report(self, report: LoadReport, ttl: float) -> None:
        params = {"source": report.source, "body": report.model_dump_json(exclude={"expires_in"}), "ttl": float(ttl)}

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(self._sql["put_load_report"], params)
            await conn.execute(self._sql["gc_load_reports"])

        await self._run(self._engine, op, write=True, repeatable=True)

    async def list_load_reports(self) -> list[LoadReport]:
        async def op(conn: AsyncConnection) -> list[LoadReport]:
            rows = (await conn.execute(self._sql["load_reports"])).all()
            out = []
            for r in rows:
                doc = _loads(r.body)
                doc["expires_in"] = float(r.left_s)
                out.append(LoadReport.model_validate(doc))
            return out

        return await self._run(self._reader, op, write=False)

    # -- leases --------------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        params = {"name": name, "holder": holder, "ttl": float(ttl)}

        async def op(conn: AsyncConnection) -> int | None:
            res = await conn.execute(self._sql["acquire_lease"], params)
            if self.dialect != "mysql":
                token = res.scalar()
                return None if token is None else int(token)
            # Same transaction, so this reads the row as our upsert left it (and locked it).
            row = (await conn.execute(self._sql["lease_row"], {"name": name})).one()
            return int(row.token) if row.holder == holder else None

        token = await self._run(self._single, op, write=True, repeatable=True)
        # Taken or renewed: expires_at was set to store-now + ttl by this very statement.
        return None if token is None else Lease(name=name, holder=holder, token=token, expires_in=float(ttl))

    async def release_lease(self, name: str, holder: str) -> None:
        async def op(conn: AsyncConnection) -> None:
            await conn.execute(self._sql["release_lease"], {"name": name, "holder": holder})

        await self._run(self._single, op, write=True, repeatable=True)

    async def get_lease(self, name: str) -> Lease | None:
        async def op(conn: AsyncConnection) -> Lease | None:
            row = (await conn.execute(self._sql["get_lease"], {"name": name})).first()
            if row is None:
                return None
            return Lease(name=name, holder=row.holder, token=int(row.token), expires_in=float(row.left_s))

        return await self._run(self._reader, op, write=False)

    # -- routing revision ----------------------------------------------------------
    async def get_revision(self) -> int:
        return int(await self._scalar("revision"))

    async def bump_revision(self) -> int:
        return await self._run(self._single, self._bump, write=True, repeatable=True)

    async def advance_revision(self, at_least: int) -> int:
        async def op(conn: AsyncConnection) -> int:
            await conn.execute(self._sql["advance"], {"n": int(at_least)})
            return int((await conn.execute(self._sql["revision"])).scalar_one())

        return await self._run(self._engine, op, write=True, repeatable=True)

    # -- identity, auth state, outages ---------------------------------------------------
    async def get_cluster_meta(self) -> ClusterMeta:
        async def op(conn: AsyncConnection) -> dict[str, str] | None:
            try:
                return {r.name: r.value for r in await conn.execute(self._sql["meta"])}
            except sa.exc.DBAPIError as exc:
                if _is_missing_table(exc):
                    return None  # no schema: a store that was never migrated, or lost its state
                raise

        rows = await self._run(self._reader, op, write=False)
        if not rows or not rows.get("cluster_id"):
            return ClusterMeta(cluster_id=None)
        replaces = tuple(x for x in rows.get("replaces", "").split(",") if x)
        return ClusterMeta(cluster_id=rows["cluster_id"], auth=rows.get("auth", "none"), replaces=replaces)

    async def _set_meta(self, conn: AsyncConnection, name: str, value: str) -> None:
        await conn.execute(self._sql["set_meta"], {"name": name, "value": value})

    async def open_inference(self) -> None:
        async def op(conn: AsyncConnection) -> None:
            await self._set_meta(conn, "auth", AUTH_OPENED)
            await self._bump(conn)

        await self._run(self._engine, op, write=True, repeatable=True)

    async def record_accepted(self, replaced_cluster_id: str, auth_required: bool) -> None:
        async def op(conn: AsyncConnection) -> None:
            rows = {r.name: r.value for r in await conn.execute(self._sql["meta"])}
            replaces = [x for x in rows.get("replaces", "").split(",") if x]
            if replaced_cluster_id not in replaces:
                replaces.append(replaced_cluster_id)
            await self._set_meta(conn, "replaces", ",".join(replaces))
            if auth_required:
                await self._set_meta(conn, "auth", AUTH_REQUIRED)
            await self._bump(conn)

        await self._run(self._engine, op, write=True, repeatable=True)

    async def record_outage(self) -> float:
        async def op(conn: AsyncConnection) -> float:
            # Locks the row (SQLite: the transaction is BEGIN IMMEDIATE), so two controllers
            # recording one outage at once queue here and the second adds (almost) nothing.
            before = float((await conn.execute(self._sql["paused"])).scalar_one())
            await conn.execute(self._sql["record_outage"])
            return float((await conn.execute(self._sql["paused"])).scalar_one()) - before

        return await self._run(self._engine, op, write=True)

    # -- api keys ------------------------------------------------------------------
    async def create_api_key(self, key: ApiKey) -> ApiKey:
        params = {"id": key.id, "name": key.name, "secret_hash": key.secret_hash, "revoked": key.revoked}

        async def op(conn: AsyncConnection) -> ApiKey:
            try:
                await conn.execute(self._sql["insert_key"], params)
            except sa.exc.IntegrityError as exc:
                raise StoreError(f"api key {key.id} exists") from exc
            await self._set_meta(conn, "auth", AUTH_REQUIRED)
            await self._bump(conn)
            return _api_key((await conn.execute(self._sql["key"], {"id": key.id})).one())

        return await self._run(self._engine, op, write=True)

    async def list_api_keys(self) -> list[ApiKey]:
        async def op(conn: AsyncConnection) -> list[ApiKey]:
            return [_api_key(r) for r in await conn.execute(self._sql["keys"])]

        return await self._run(self._reader, op, write=False)

    async def revoke_api_key(self, key_id: str) -> bool:
        async def op(conn: AsyncConnection) -> bool:
            if (await conn.execute(self._sql["revoke_key"], {"id": key_id, "revoked": True})).rowcount == 0:
                return False
            await self._bump(conn)
            return True

        return await self._run(self._engine, op, write=True, repeatable=True)


def _pyformat(sql: str) -> str:
    """``:name`` bind parameters (SQLAlchemy text) to ``%(name)s`` (psycopg)."""
    assert "%" not in sql and "::" not in sql, "escape % / avoid :: casts in raw statements"
    return re.sub(r"(?<![\w:]):(\w+)", r"%(\1)s", sql)


def _install_ping_hooks(engine: sa.Engine, idle_s: float) -> None:
    """Pre-ping a pooled connection on checkout, unless it was in use within ``idle_s``.

    This is SQLAlchemy's pool_pre_ping with one change: a connection checked in a moment ago
    is trusted. pool_pre_ping costs a round trip on every checkout, which would double the
    cost of a heartbeat; under load connections cycle within milliseconds, and a connection
    that sat idle (when a restarted server has most likely killed it) is still pinged. A
    connection that dies while busy raises a disconnect error, on which SQLAlchemy (or
    _raw_execute) invalidates the pool, so the next checkout reconnects."""

    @event.listens_for(engine, "connect")
    def _fresh(dbapi_conn: Any, rec: Any) -> None:
        rec.info["modelfleet_used"] = time.monotonic()
        if engine.dialect.name == "postgresql":
            # psycopg parses json columns with the stdlib by default: most of list_workers()'s
            # CPU for a big cluster. orjson does it several times faster.
            from psycopg.types.json import set_json_loads

            set_json_loads(orjson.loads, dbapi_conn.driver_connection)

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, rec: Any) -> None:
        rec.info["modelfleet_used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
        if time.monotonic() - rec.info.get("modelfleet_used", 0.0) < idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out (connects) another.
            raise sa.exc.DisconnectionError("stale pooled connection") from exc


# -- row mapping -------------------------------------------------------------------
def _instance_params(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id,
        "model": inst.model,
        "deployment": inst.deployment,
        "worker_id": inst.worker_id,
        "backend": inst.backend,
        "source": inst.source,
        "params": _dumps(inst.params),
        "weight": inst.weight,
        "max_concurrency": inst.max_concurrency,
        "enabled": inst.enabled,
        "pending_reason": inst.pending_reason,
        "state": InstanceState(inst.state).value,
        "endpoint": inst.endpoint,
        "restarts": inst.restarts,
        "last_error": inst.last_error,
    }


def _worker(row: sa.Row[Any]) -> WorkerRecord:
    # Positional: the column order of _WORKER_COLUMNS + age. list_workers() maps thousands of
    # rows on the controller's event loop, so this stays lean.
    wid, name, address, port, labels, resources, version, last_hb, registered_at, age = row
    return WorkerRecord.model_validate(
        {
            "id": wid,
            "name": name,
            "address": address,
            "port": port,
            "labels": _loads(labels),
            "resources": _loads(resources),
            "version": version,
            "last_heartbeat": float(last_hb),
            "registered_at": float(registered_at),
            "heartbeat_age": float(age),
        }
    )


def _instance(row: sa.Row[Any]) -> Instance:
    m = row._mapping
    data = {c: m[c] for c in _INSTANCE_COLUMNS}
    data["params"] = _loads(data["params"])
    data["enabled"] = bool(data["enabled"])
    data["updated_at"] = float(data["updated_at"])
    return Instance(**data)


def _deployment(row: sa.Row[Any]) -> Deployment:
    body = _loads(row.body)
    body.update(created_at=float(row.created_at), updated_at=float(row.updated_at))
    return Deployment.model_validate(body)


def _api_key(row: sa.Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        secret_hash=row.secret_hash,
        created_at=float(row.created_at),
        revoked=bool(row.revoked),
    )


# -- error classification ------------------------------------------------------------
# Retried inside _run: the transaction was rolled back whole, so running it again is safe.
_RETRY_SQLSTATES = {"40001", "40P01"}  # PostgreSQL serialization failure, deadlock
_RETRY_MYSQL = {1213}  # deadlock found when trying to get lock
_MYSQL_CONFIG = {
    1044: "access denied to the database",
    1045: "authentication failed",
    1049: "unknown database",
    1698: "authentication failed",
    2005: "unknown host",
}
_MYSQL_GONE = {2003, 2006, 2013, 2055, 1053, 1927, 4031}


def _driver_error(exc: BaseException) -> BaseException:
    return getattr(exc, "orig", None) or exc


def _is_retryable(exc: BaseException) -> bool:
    orig = _driver_error(exc)
    if getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    return type(orig).__module__.startswith("pymysql") and bool(args) and args[0] in _RETRY_MYSQL


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated


def _is_missing_table(exc: BaseException) -> bool:
    orig = _driver_error(exc)
    if getattr(orig, "sqlstate", None) == "42P01":
        return True
    args = getattr(orig, "args", ())
    if args and args[0] == 1146:
        return True
    return isinstance(orig, sqlite3.OperationalError) and "no such table" in str(orig)


def _caused_by_dns(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify_error(exc: BaseException) -> tuple[str, str]:
    """("config" | "unavailable" | "error", short reason). The reason is ours, never the
    driver's text, which can carry user names and DSN fragments."""
    orig = _driver_error(exc)
    if isinstance(exc, sa.exc.TimeoutError):
        return "unavailable", "no free connection in the pool (store overloaded or slow)"
    if isinstance(exc, sa.exc.ArgumentError | sa.exc.NoSuchModuleError):
        return "config", "malformed store URL"
    msg = str(orig)
    low = msg.lower()
    if _caused_by_dns(orig) or "failed to resolve host" in low or "could not translate host" in low:
        return "config", "unknown host"
    mod = type(orig).__module__
    if mod.startswith("pymysql"):
        code = orig.args[0] if orig.args and isinstance(orig.args[0], int) else None
        if code in _MYSQL_CONFIG:
            return "config", _MYSQL_CONFIG[code]
        if code == 2003:
            return "unavailable", "connection refused or unreachable"
        if code in _MYSQL_GONE:
            return "unavailable", "connection to the server lost"
        if code == 1205:
            return "unavailable", "lock wait timeout"
    if mod.startswith("psycopg"):
        state = getattr(orig, "sqlstate", None) or ""
        if state.startswith("28") or "password authentication failed" in low or "no password supplied" in low:
            return "config", "authentication failed"
        if state == "3D000" or ('database "' in low and "does not exist" in low):
            return "config", "unknown database"
        if 'role "' in low and "does not exist" in low:
            return "config", "authentication failed (unknown role)"
        if "connection refused" in low:
            return "unavailable", "connection refused"
        if "timeout" in low:
            return "unavailable", "connection timed out"
        # Connection-level failures carry no SQLSTATE (or class 08/57); a statement error
        # without one (a bad parameter, a bug) is not an outage.
        connection_level = type(orig).__name__ in ("OperationalError", "InterfaceError")
        if state.startswith(("08", "57")) or (not state and connection_level):
            return "unavailable", "connection to the server lost"
    if isinstance(orig, sqlite3.Error):
        if "unable to open database file" in low:
            return "config", "cannot open the database file"
        if "locked" in low or "busy" in low:
            return "unavailable", "database is locked by another writer"
        if "disk i/o" in low or "readonly" in low or "read-only" in low:
            return "unavailable", "database file not writable"
    if isinstance(orig, ConnectionRefusedError):
        return "unavailable", "connection refused"
    if isinstance(orig, OSError | ConnectionError | TimeoutError):
        return "unavailable", f"connection failed ({type(orig).__name__})"
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return "unavailable", "connection to the server lost"
    if isinstance(exc, sa.exc.InterfaceError):
        return "unavailable", "connection to the server lost"
    # Not a connection problem (a constraint, a bug): statement errors carry no credentials,
    # and their first line is what one needs to fix it.
    first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
    return "error", f"{type(orig).__name__}: {first}"


# Exported for tests and the CLI ("modelfleet controller --store URL" prints this on failure).
__all__ = ["SQLStore", "classify_error", "head_revision"]
