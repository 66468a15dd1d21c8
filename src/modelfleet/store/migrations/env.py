"""Alembic environment for modelfleet's SQL store.

Configured programmatically by ``SQLStore.migrate()``: it opens a sync connection, takes the
migration lock and hands the connection in through ``config.attributes["connection"]``. There
is no alembic.ini and no logging setup here, so running migrations never reconfigures the
host application's logging.
"""

from __future__ import annotations

from alembic import context

VERSION_TABLE = "modelfleet_schema_version"

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable by running alembic by hand
    raise RuntimeError("modelfleet migrations run through SQLStore.migrate(), which passes a connection")

context.configure(
    connection=connection,
    target_metadata=None,
    # Our own version table, so a database shared with another Alembic-managed app is safe.
    version_table=VERSION_TABLE,
    # SQLite does DDL inside transactions; running the whole upgrade in the caller's
    # BEGIN IMMEDIATE transaction is what makes two controllers' migrate() calls serialize.
    transactional_ddl=connection.dialect.name in ("sqlite", "postgresql"),
)

with context.begin_transaction():
    context.run_migrations()
