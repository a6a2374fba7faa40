"""registry: never-reused version numbers, tags, metric rows, exports, archiving

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows need values for the new NOT NULL columns; the server defaults only serve
    # this migration and are dropped again, since the application always sets the columns.
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("version_counter", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE models SET version_counter = COALESCE("
        "(SELECT MAX(version) FROM model_versions WHERE model_versions.model_id = models.id), 0)"
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.alter_column("version_counter", server_default=None)

    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("exports", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("archived_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.alter_column("exports", server_default=None)

    op.create_table(
        "model_tags",
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("tag", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_model_tags_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_id", "tag", name=op.f("pk_model_tags")),
    )
    with op.batch_alter_table("model_tags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_tags_tag"), ["tag"], unique=False)

    op.create_table(
        "model_version_tags",
        sa.Column("version_id", sa.String(length=40), nullable=False),
        sa.Column("tag", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"],
            name=op.f("fk_model_version_tags_version_id_model_versions"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version_id", "tag", name=op.f("pk_model_version_tags")),
    )
    with op.batch_alter_table("model_version_tags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_version_tags_tag"), ["tag"], unique=False)

    op.create_table(
        "model_version_metrics",
        sa.Column("version_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"],
            name=op.f("fk_model_version_metrics_version_id_model_versions"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version_id", "name", name=op.f("pk_model_version_metrics")),
    )
    # Versions published before this revision become searchable by their metrics too.
    postgres = op.get_bind().dialect.name == "postgresql"
    for name in ("val_accuracy", "val_loss"):
        value = (
            f"CAST(metrics->>'{name}' AS FLOAT)"
            if postgres
            else f"json_extract(metrics, '$.{name}')"
        )
        op.execute(
            "INSERT INTO model_version_metrics (version_id, name, value) "
            f"SELECT id, '{name}', {value} FROM model_versions WHERE {value} IS NOT NULL"
        )

def downgrade() -> None:
    op.drop_table("model_version_metrics")
    with op.batch_alter_table("model_version_tags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_version_tags_tag"))
    op.drop_table("model_version_tags")
    with op.batch_alter_table("model_tags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_tags_tag"))
    op.drop_table("model_tags")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("archived_at")
        batch_op.drop_column("exports")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("version_counter")
