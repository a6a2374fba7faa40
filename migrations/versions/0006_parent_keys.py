"""a chained job's parent is a storage key, not a host path

Plans stored in `jobs.plan` and `model_versions.plan` named a chained job's parent model by the
absolute path of its files on the API's host (`parent_dir`), which no other host can read and
which breaks when the storage root moves. They now name it by the parent version's storage key
(`parent`, e.g. `models/<job>/attempt-1`); the worker fetches the files.

Revision ID: 0006_parent_keys
Revises: 0003
Create Date: 2026-12-02
"""

import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from service.settings import get_settings

revision: str = "0006_parent_keys"
down_revision: str | None = "0005_experiments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ARTIFACT_KEY = re.compile(r"(?:^|/)(models/[^/]+/attempt-\d+)/?$")
"""A version's files' key at the end of the path the local store gave for them."""

PLAN_TABLES = ("jobs", "model_versions")


def _plans(table: str) -> sa.TableClause:
    return sa.table(table, sa.column("id", sa.String), sa.column("plan", sa.JSON))


def _rewrite(change: Any) -> None:
    """Apply `change(plan) -> plan or None` (None: leave the row) to every stored plan."""
    connection = op.get_bind()
    for name in PLAN_TABLES:
        table = _plans(name)
        for row_id, plan in connection.execute(sa.select(table.c.id, table.c.plan)).all():
            changed = change(plan)
            if changed is not None:
                connection.execute(
                    sa.update(table).where(table.c.id == row_id).values(plan=changed)
                )


def upgrade() -> None:
    versions = sa.table(
        "model_versions", sa.column("id", sa.String), sa.column("artifact_prefix", sa.String)
    )
    version_keys = dict(
        op.get_bind().execute(sa.select(versions.c.id, versions.c.artifact_prefix)).all()
    )

    def to_key(plan: dict[str, Any]) -> dict[str, Any] | None:
        if "parent_dir" not in plan:
            return None
        changed = {name: value for name, value in plan.items() if name != "parent_dir"}
        path = plan["parent_dir"]
        key = version_keys.get(plan.get("extra", {}).get("parent_version_id"))
        if key is None and path is not None and (found := ARTIFACT_KEY.search(path)):
            # The parent version was deleted since: the key its files had in the local store.
            # (Only an object store's cache path matches neither; no release wrote one.)
            key = found.group(1)
        changed["parent"] = key
        return changed

    _rewrite(to_key)


def downgrade() -> None:
    # The code before this revision read the parent from the local artifact folder.
    storage_dir = get_settings().resolved_storage_dir

    def to_path(plan: dict[str, Any]) -> dict[str, Any] | None:
        if "parent" not in plan:
            return None
        changed = {name: value for name, value in plan.items() if name != "parent"}
        key = plan["parent"]
        changed["parent_dir"] = None if key is None else str(storage_dir / key)
        return changed

    _rewrite(to_path)
