"""least confident: a model's per-window count of least confident inputs kept, and their flag

Revision ID: 0013_least_confident
Revises: 0012_webhooks
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_least_confident"
down_revision: str | None = "0012_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("capture_least_confident", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("monitor_predictions") as batch:
        batch.add_column(
            sa.Column("low_confidence", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("monitor_predictions") as batch:
        batch.drop_column("low_confidence")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("capture_least_confident")
