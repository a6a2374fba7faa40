"""monitoring: predictions kept per version, and their windows' shift tests

Revision ID: 0010_monitoring
Revises: 0009_ingest_lease
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_monitoring"
down_revision: str | None = "0009_ingest_lease"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "monitor_windows",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "version_id",
            sa.String(40),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("start", sa.DateTime(), nullable=False),
        sa.Column("end", sa.DateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float()),
        sa.Column("p_value", sa.Float()),
        sa.Column("shifted", sa.Boolean()),
        sa.Column("estimated_accuracy", sa.Float()),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("version_id", "seq"),
    )
    op.create_index("ix_monitor_windows_version_id", "monitor_windows", ["version_id"])
    op.create_table(
        "monitor_predictions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "version_id",
            sa.String(40),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("predicted", sa.String(200), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("features", sa.LargeBinary()),
        sa.Column(
            "window_id",
            sa.String(40),
            sa.ForeignKey("monitor_windows.id", ondelete="SET NULL"),
        ),
        sa.Column("label", sa.String(200)),
        sa.Column("labelled_at", sa.DateTime()),
    )
    op.create_index("ix_monitor_predictions_version_id", "monitor_predictions", ["version_id"])
    op.create_index("ix_monitor_predictions_created_at", "monitor_predictions", ["created_at"])
    op.create_index("ix_monitor_predictions_window_id", "monitor_predictions", ["window_id"])


def downgrade() -> None:
    op.drop_table("monitor_predictions")
    op.drop_table("monitor_windows")
