"""Load reports of gateways, for the autoscaler (issue 12).

- ``load_reports`` (source -> body): one row per gateway process, upserted every second;
  ``expires_at`` is store time + the report's time to live. Readers take only rows with
  ``expires_at > now()``, so a gateway that dies stops counting when its last report
  expires, whatever any controller does; writers delete expired rows (index on expires_at).

The autoscaling policy and status of a deployment live in its JSON body: no column.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "load_reports",
        sa.Column("source", sa.String(255), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        **MYSQL,
    )
    op.create_index("ix_load_reports_expires_at", "load_reports", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_load_reports_expires_at", "load_reports")
    op.drop_table("load_reports")
