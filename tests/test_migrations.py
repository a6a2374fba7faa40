"""The Alembic migrations build exactly the schema the models describe, on SQLite and Postgres."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from service.cli import MIGRATIONS
from service.db import Base, make_engine
from service.settings import get_settings
from service.tables import Dataset, Job, ModelVersion, RegisteredModel, Tenant
from tests.conftest import fresh_postgres_database


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    return config


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of this test's own: the session's shared Postgres database may have
    been migrated already by the tests that ran before."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


def test_upgrade_matches_models_and_downgrades(database_url: str) -> None:
    engine = make_engine(database_url)
    assert inspect(engine).get_table_names() == [], "the migrations must start from empty"
    config = alembic_config(database_url)
    command.upgrade(config, "head")
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert drift == []
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


PARENT_KEYS = "0006_parent_keys"


def _plan(parent: str | None, parent_version_id: str | None = None) -> dict[str, Any]:
    extra = {"strategy": "fine_tune"}
    if parent_version_id is not None:
        extra["parent_version_id"] = parent_version_id
    return {"base_model": "resnet18", "parent": parent, "extra": extra}


def test_parent_keys_migration_rewrites_stored_plans_both_ways(database_url: str) -> None:
    """Plans name a chained job's parent by its version's storage key; before, by the path of
    its files in the local artifact folder. Downgrading writes the paths the old code read,
    upgrading turns them back into the same keys (also for a parent version deleted since)."""
    engine = make_engine(database_url)
    config = alembic_config(database_url)
    command.upgrade(config, "head")
    plans = {
        "job_parent": _plan(None),
        "job_child": _plan("models/job_parent/attempt-1", "mv_parent"),
        "job_orphan": _plan("models/job_gone/attempt-2", "mv_gone"),
    }
    with Session(engine) as session:
        session.add(Tenant(id="tn_1", name="team"))
        session.flush()
        session.add(Dataset(id="ds_1", tenant_id="tn_1", name="digits"))
        session.add(RegisteredModel(id="mdl_1", tenant_id="tn_1", name="m"))
        session.flush()
        for job_id, plan in plans.items():
            session.add(
                Job(
                    id=job_id,
                    tenant_id="tn_1",
                    dataset_id="ds_1",
                    model_name="m",
                    base_model="resnet18",
                    strategy="fine_tune",
                    spec={},
                    plan=plan,
                    queue="cpu",
                    max_runtime_seconds=60,
                )
            )
        session.flush()
        for number, job_id in enumerate(("job_parent", "job_child"), start=1):
            session.add(
                ModelVersion(
                    id=job_id.replace("job", "mv"),
                    model_id="mdl_1",
                    version=number,
                    job_id=job_id,
                    dataset_id="ds_1",
                    base_model="resnet18",
                    strategy="fine_tune",
                    spec={},
                    plan=plans[job_id],
                    metrics={},
                    labels=[],
                    artifacts=[],
                    artifact_prefix=f"models/{job_id}/attempt-1",
                )
            )
        session.commit()

    def stored() -> dict[str, dict[str, Any]]:
        with Session(engine) as session:
            jobs = dict(session.execute(select(Job.id, Job.plan)).all())
            versions = session.execute(select(ModelVersion.job_id, ModelVersion.plan))
            for job_id, plan in versions:
                assert plan == jobs[job_id], "a version keeps its job's plan"
            return jobs

    command.downgrade(config, f"{PARENT_KEYS}-1")
    storage = get_settings().resolved_storage_dir
    old = stored()
    assert old["job_parent"]["parent_dir"] is None
    assert old["job_child"]["parent_dir"] == str(storage / "models/job_parent/attempt-1")
    assert old["job_orphan"]["parent_dir"] == str(storage / "models/job_gone/attempt-2")
    assert all("parent" not in plan for plan in old.values())

    command.upgrade(config, PARENT_KEYS)
    assert stored() == plans
    engine.dispose()


def test_skipped_count_migration_counts_what_older_datasets_list(database_url: str) -> None:
    """Before 0008 a dataset listed every skipped file; upgrading counts them."""
    engine = make_engine(database_url)
    config = alembic_config(database_url)
    command.upgrade(config, "0007_job_kind")
    skipped = json.dumps(
        [{"path": f"{n}.gif", "code": "not_an_image", "reason": "no"} for n in "ab"]
    )
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO tenants (id, name, created_at) VALUES ('tn_1', 't', CURRENT_TIMESTAMP)"
        )
        connection.exec_driver_sql(
            "INSERT INTO datasets (id, tenant_id, name, status, progress, upload_bytes, "
            "val_fraction, seed, classes, class_counts, num_images, skipped, keep_unlabelled, "
            "num_texts, num_unlabelled, created_at, updated_at) VALUES ('ds_1', 'tn_1', 'd', "
            "'ready', 1, 0, 0.2, 0, '[]', '{}', 0, '" + skipped + "', TRUE, 0, 0, "
            "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        )
    command.upgrade(config, "head")
    with Session(engine) as session:
        assert session.get_one(Dataset, "ds_1").num_skipped == 2
    command.downgrade(config, "0007_job_kind")
    engine.dispose()


def test_num_labelled_migration_counts_each_modality_under_one_name(database_url: str) -> None:
    """Before 0014 an image dataset counted its items in `num_images`, a text dataset its
    labelled texts in `num_texts`; upgrading moves both to `num_labelled`, and back."""
    engine = make_engine(database_url)
    config = alembic_config(database_url)
    command.upgrade(config, "0013_least_confident")
    rows = {"ds_img": ("image", 40, 0), "ds_txt": ("text", 0, 25), "ds_new": (None, 0, 0)}
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO tenants (id, name, created_at) VALUES ('tn_1', 't', CURRENT_TIMESTAMP)"
        )
        for dataset_id, (modality, images, texts) in rows.items():
            connection.exec_driver_sql(
                "INSERT INTO datasets (id, tenant_id, name, status, progress, upload_bytes, "
                "val_fraction, seed, classes, class_counts, num_images, skipped, "
                "keep_unlabelled, num_texts, num_unlabelled, modality, created_at, "
                f"updated_at) VALUES ('{dataset_id}', 'tn_1', 'd', 'ready', 1, 0, 0.2, 0, "
                f"'[]', '{{}}', {images}, '[]', TRUE, {texts}, 0, "
                f"{'NULL' if modality is None else repr(modality)}, CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP)"
            )
    command.upgrade(config, "head")
    with Session(engine) as session:
        counted = {key: session.get_one(Dataset, key).num_labelled for key in rows}
    assert counted == {"ds_img": 40, "ds_txt": 25, "ds_new": 0}
    command.downgrade(config, "0013_least_confident")
    with engine.begin() as connection:
        back = connection.exec_driver_sql(
            "SELECT id, num_images, num_texts FROM datasets ORDER BY id"
        ).fetchall()
    assert [tuple(row) for row in back] == [("ds_img", 40, 0), ("ds_new", 0, 0), ("ds_txt", 0, 25)]
    engine.dispose()
