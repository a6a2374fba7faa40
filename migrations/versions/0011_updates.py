"""updates: a model's input capture, captured inputs per prediction, updates from feedback

Revision ID: 0011_updates
Revises: 0010_monitoring
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_updates"
down_revision: str | None = "0010_monitoring"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("capture", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("monitor_predictions") as batch:
        batch.add_column(sa.Column("input_key", sa.String(200)))
        batch.add_column(sa.Column("input_bytes", sa.Integer()))
    op.create_table(
        "model_updates",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(40),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "model_id",
            sa.String(40),
            sa.ForeignKey("models.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "from_version_id",
            sa.String(40),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.String(40), sa.ForeignKey("datasets.id")),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id")),
        sa.Column("holdout", sa.JSON(), nullable=False),
        sa.Column("scores", sa.JSON()),
        sa.Column("promoted", sa.Boolean()),
        sa.Column("error_code", sa.String(50)),
        sa.Column("error_message", sa.Text()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_model_updates_tenant_id", "model_updates", ["tenant_id"])
    op.create_index("ix_model_updates_model_id", "model_updates", ["model_id"])
    op.create_index("ix_model_updates_job_id", "model_updates", ["job_id"])
    op.create_index("ix_model_updates_dataset_id", "model_updates", ["dataset_id"])


def downgrade() -> None:
    op.drop_table("model_updates")
    with op.batch_alter_table("monitor_predictions") as batch:
        batch.drop_column("input_bytes")
        batch.drop_column("input_key")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("capture")
