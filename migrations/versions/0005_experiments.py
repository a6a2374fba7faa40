"""experiments: trials of base models x strategies on one dataset, their events

Revision ID: 0005_experiments
Revises: 0004_text_datasets
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_experiments"
down_revision: str | None = "0004_text_datasets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("max_parallel", sa.Integer(), nullable=False),
        sa.Column("deadline_at", sa.DateTime(), nullable=True),
        sa.Column("test_split_key", sa.String(length=200), nullable=False),
        sa.Column("test_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_experiments_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_experiments_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
    )
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_experiments_dataset_id"), ["dataset_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_experiments_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_experiments_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "experiment_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_experiment_events_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_events")),
    )
    with op.batch_alter_table("experiment_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_experiment_events_experiment_id"), ["experiment_id"], unique=False
        )

    op.create_table(
        "experiment_trials",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(length=300), nullable=False),
        sa.Column("strategy", sa.String(length=50), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("trainable_parameters", sa.Integer(), nullable=False),
        sa.Column("total_parameters", sa.Integer(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_experiment_trials_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_experiment_trials_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_trials")),
        sa.UniqueConstraint("job_id", name=op.f("uq_experiment_trials_job_id")),
    )
    with op.batch_alter_table("experiment_trials", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_experiment_trials_experiment_id"), ["experiment_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("experiment_trials", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_experiment_trials_experiment_id"))

    op.drop_table("experiment_trials")
    with op.batch_alter_table("experiment_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_experiment_events_experiment_id"))

    op.drop_table("experiment_events")
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_experiments_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_experiments_status"))
        batch_op.drop_index(batch_op.f("ix_experiments_dataset_id"))

    op.drop_table("experiments")
