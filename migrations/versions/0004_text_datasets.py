"""text datasets: modality, text and label columns, text counts, token-length summary

Revision ID: 0004_text_datasets
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_text_datasets"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows need values for the new NOT NULL columns; the server defaults serve only
    # this migration and are dropped again, since the application always sets the columns.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("modality", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("text_column", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("label_column", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("keep_unlabelled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(
            sa.Column("num_texts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("num_unlabelled", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("token_lengths", sa.JSON(), nullable=True))
    # Every dataset before this revision is an image dataset; one still processing stays
    # None until its archive is read, as new ones do.
    op.execute("UPDATE datasets SET modality = 'image' WHERE status != 'processing'")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("keep_unlabelled", server_default=None)
        batch_op.alter_column("num_texts", server_default=None)
        batch_op.alter_column("num_unlabelled", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("token_lengths")
        batch_op.drop_column("num_unlabelled")
        batch_op.drop_column("num_texts")
        batch_op.drop_column("keep_unlabelled")
        batch_op.drop_column("label_column")
        batch_op.drop_column("text_column")
        batch_op.drop_column("modality")
