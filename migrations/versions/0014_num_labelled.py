"""num_labelled: a dataset's labelled items under one name, whatever its modality

Before, an image dataset counted its items in `num_images` and a text dataset its labelled
texts in `num_texts` (its `num_images` 0): a column per modality.

Revision ID: 0014_num_labelled
Revises: 0013_least_confident
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_num_labelled"
down_revision: str | None = "0013_least_confident"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE, no batch copy: SQLite (3.35 on) drops an unconstrained column in
    # place, where batch mode's table copy is refused while jobs reference the datasets.
    op.add_column(
        "datasets", sa.Column("num_labelled", sa.Integer(), nullable=False, server_default="0")
    )
    op.execute(
        "UPDATE datasets SET num_labelled = CASE WHEN modality = 'text' THEN num_texts "
        "ELSE num_images END"
    )
    op.drop_column("datasets", "num_images")
    op.drop_column("datasets", "num_texts")


def downgrade() -> None:
    for column in ("num_images", "num_texts"):
        op.add_column(
            "datasets", sa.Column(column, sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE datasets SET num_images = CASE WHEN modality = 'text' THEN 0 "
        "ELSE num_labelled END, num_texts = CASE WHEN modality = 'text' THEN num_labelled "
        "ELSE 0 END"
    )
    op.drop_column("datasets", "num_labelled")
