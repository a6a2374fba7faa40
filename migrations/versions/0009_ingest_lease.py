"""ingest holds a lease, as a running job does

Revision ID: 0009_ingest_lease
Revises: 0008_skipped_count
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0009_ingest_lease"
down_revision: str | None = "0008_skipped_count"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("attempt", "lease_owner", "lease_expires_at", "worker_losses")


def upgrade() -> None:
    # Added and dropped in place (as in 0008), never by rebuilding the table, which fails on
    # SQLite while jobs reference datasets: the counters keep their server defaults.
    op.add_column(
        "datasets", sa.Column("attempt", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("datasets", sa.Column("lease_owner", sa.String(200), nullable=True))
    op.add_column("datasets", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.add_column(
        "datasets", sa.Column("worker_losses", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE datasets DROP COLUMN {column}")
