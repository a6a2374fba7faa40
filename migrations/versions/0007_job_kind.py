"""jobs have a kind: `train`, or `lr_find` (the learning-rate range test)

Revision ID: 0007_job_kind
Revises: 0006_parent_keys
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_job_kind"
down_revision: str | None = "0006_parent_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every job so far trained a model; the server default serves only this migration.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=20), nullable=False, server_default="train")
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("kind", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("kind")
