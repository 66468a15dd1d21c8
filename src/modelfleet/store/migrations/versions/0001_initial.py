"""Initial schema: workers, instances, deployments, leases, revision, api_keys.

Times are DOUBLE epoch seconds taken from the database's own clock (DESIGN.md principle 4):
one representation that PostgreSQL, MySQL/MariaDB and SQLite all compare and subtract the
same way. No unique key or primary key contains a NULL-able column (principle 5).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(128)
NAME = sa.String(255)
# MySQL/MariaDB: utf8mb4 whatever the server default is, and binary collation so that ids and
# names compare case-sensitively as on PostgreSQL and SQLite ("W1" and "w1" are two workers).
MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", NAME, nullable=False),
        sa.Column("address", NAME, nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("resources", sa.JSON, nullable=False),
        sa.Column("version", NAME, nullable=False, server_default=""),
        sa.Column("last_heartbeat", sa.Double, nullable=False),
        sa.Column("registered_at", sa.Double, nullable=False),
        # Heartbeats received since registration. Its value after the upsert (1 = the row was
        # just inserted) is how PostgreSQL/SQLite tell a registration from a renewal in the same
        # statement, and it makes every MySQL upsert change the row (affected rows 2, never 0/1).
        sa.Column("beats", sa.BigInteger, nullable=False, server_default="1"),
        **MYSQL,
    )
    op.create_index("ix_workers_last_heartbeat", "workers", ["last_heartbeat"])

    op.create_table(
        "instances",
        sa.Column("id", ID, primary_key=True),
        sa.Column("model", NAME, nullable=False),
        sa.Column("deployment", NAME, nullable=True),  # NULL: declared by its worker
        sa.Column("worker_id", ID, nullable=True),  # NULL: not placed yet
        sa.Column("backend", NAME, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("pending_reason", sa.Text, nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.Text, nullable=True),
        sa.Column("restarts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Double, nullable=False),
        **MYSQL,
    )
    # Plain (non-unique) indexes: NULL-able columns are fine here.
    op.create_index("ix_instances_worker_id", "instances", ["worker_id"])
    op.create_index("ix_instances_model", "instances", ["model"])

    op.create_table(
        "deployments",
        sa.Column("name", NAME, primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),  # the Deployment minus its timestamps
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        **MYSQL,
    )

    op.create_table(
        "leases",
        sa.Column("name", NAME, primary_key=True),
        sa.Column("holder", NAME, nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        **MYSQL,
    )

    revision_table = op.create_table(
        "revision",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("rev", sa.BigInteger, nullable=False),
        **MYSQL,
    )
    op.bulk_insert(revision_table, [{"id": 1, "rev": 0}])

    op.create_table(
        "api_keys",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", NAME, nullable=False),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        **MYSQL,
    )


def downgrade() -> None:
    for table in ("api_keys", "revision", "leases", "deployments", "instances", "workers"):
        op.drop_table(table)
