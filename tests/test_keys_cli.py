"""`thaw keys` works on the service's own database and says which one; it never makes a new one."""

import subprocess
from pathlib import Path

from tests.conftest import fresh_postgres_database
from tests.processes import THAW, thaw_env


def _thaw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*THAW, *args], env=env, capture_output=True, text=True, timeout=120)


def test_keys_refuse_a_database_that_does_not_exist_and_create_nothing(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    env = thaw_env(data)

    refused = _thaw(env, "keys", "create", "--tenant", "team-a")

    assert refused.returncode == 1
    assert f"Database: sqlite:///{data.resolve()}/thaw.db" in refused.stderr
    assert "No thaw database at" in refused.stderr
    assert "thaw migrate" in refused.stderr
    assert refused.stdout == ""
    assert not (data / "thaw.db").exists()


def test_keys_name_the_database_they_use(tmp_path: Path) -> None:
    env = thaw_env(tmp_path / "data")
    subprocess.run([*THAW, "migrate"], env=env, check=True, capture_output=True)

    created = _thaw(env, "keys", "create", "--tenant", "team-a")

    assert created.returncode == 0, created.stderr
    assert f"Database: sqlite:///{(tmp_path / 'data').resolve()}/thaw.db" in created.stderr
    assert created.stdout.strip().startswith("thaw_")
    listed = _thaw(env, "keys", "list")
    assert "team-a" in listed.stdout


def test_a_postgres_database_without_tables_is_refused(tmp_path: Path) -> None:
    with fresh_postgres_database() as empty:
        env = thaw_env(tmp_path / "data", THAW_DATABASE_URL=empty)
        refused = _thaw(env, "keys", "list")
    assert refused.returncode == 1
    assert "has no thaw tables yet" in refused.stderr
