"""The Alembic migrations build exactly the schema the models describe, on SQLite and Postgres."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.cli import MIGRATIONS
from service.db import Base, make_engine
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
