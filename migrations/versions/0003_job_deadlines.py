"""job deadlines and lost-worker count

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows need values for the new NOT NULL columns; the server defaults serve only
    # this migration and are dropped again, since the application always sets the columns.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("worker_losses", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("max_runtime_seconds", sa.Integer(), nullable=False, server_default="86400")
        )
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("worker_losses", server_default=None)
        batch_op.alter_column("max_runtime_seconds", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("max_runtime_seconds")
        batch_op.drop_column("worker_losses")
