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
    # A plain ADD COLUMN (SQLite has it): a batch copy of `jobs` would drop the table that
    # events, versions and trials reference. Every job so far trained a model.
    op.add_column(
        "jobs", sa.Column("kind", sa.String(length=20), nullable=False, server_default="train")
    )


def downgrade() -> None:
    op.drop_column("jobs", "kind")
