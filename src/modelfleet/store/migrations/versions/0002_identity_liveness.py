"""Cluster identity, auth state, liveness across outages, revisions from the time in ms.

- ``cluster_meta`` (name -> value): ``cluster_id``, a random id written here, once; a store
  that lost its state shows none (or a new one), which controllers and gateways detect.
  ``auth``: "required" once any API key was created (set here already when keys exist),
  "opened" only by an explicit admin act. ``replaces``: cluster ids an operator accepted
  this store in place of (comma-separated).
- ``liveness`` (one row): ``paused`` = total seconds during which the store took no
  heartbeat (recorded by controllers that regain the store), ``paused_until`` = store time
  up to which that is counted, so several controllers count one outage once.
- ``workers.live_at``: the liveness clock (store time minus ``paused``) at the worker's last
  heartbeat; heartbeat_age = (store now - paused) - live_at.
- The routing revision jumps to the time in milliseconds: a store that is created again
  (lost its state) starts far above any revision a reader holds.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    meta = op.create_table(
        "cluster_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        **MYSQL,
    )
    op.bulk_insert(meta, [{"name": "cluster_id", "value": uuid.uuid4().hex}])
    # A store upgraded with keys in it already requires them.
    op.execute("INSERT INTO cluster_meta (name, value) SELECT 'auth', 'required' FROM api_keys LIMIT 1")

    liveness = op.create_table(
        "liveness",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("paused", sa.Double, nullable=False),
        sa.Column("paused_until", sa.Double, nullable=False),
        **MYSQL,
    )
    op.bulk_insert(liveness, [{"id": 1, "paused": 0.0, "paused_until": 0.0}])

    op.add_column("workers", sa.Column("live_at", sa.Double, nullable=False, server_default="0"))
    op.execute("UPDATE workers SET live_at = last_heartbeat")  # nothing paused yet
    op.create_index("ix_workers_live_at", "workers", ["live_at"])

    ms = int(time.time() * 1000)
    op.execute(sa.text("UPDATE revision SET rev = :ms WHERE id = 1 AND rev < :ms").bindparams(ms=ms))


def downgrade() -> None:
    op.drop_index("ix_workers_live_at", "workers")
    op.drop_column("workers", "live_at")
    op.drop_table("liveness")
    op.drop_table("cluster_meta")
