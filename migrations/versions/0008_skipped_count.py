"""datasets count every skipped file or row, and list only the first ones

Revision ID: 0008_skipped_count
Revises: 0007_job_kind
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_skipped_count"
down_revision: str | None = "0007_job_kind"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Added and dropped in place, never by rebuilding the table (SQLite's batch mode), which
    # fails while jobs reference datasets: so the column keeps its server default.
    op.add_column(
        "datasets", sa.Column("num_skipped", sa.Integer(), nullable=False, server_default="0")
    )
    # Datasets from before this revision list every skipped file or row they have (SQLite
    # and Postgres both have json_array_length).
    op.execute("UPDATE datasets SET num_skipped = json_array_length(skipped)")


def downgrade() -> None:
    op.execute("ALTER TABLE datasets DROP COLUMN num_skipped")
