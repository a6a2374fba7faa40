"""The README is the front door: its configuration table must list every setting, and only those."""

import re
from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_configuration_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(THAW_[A-Z_]+)` \|", README.read_text(), re.MULTILINE))
    assert documented == {f"THAW_{name.upper()}" for name in Settings.model_fields}


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in README.read_text()
    assert "./scripts/test.sh" in ci
    assert "THAW_REQUIRE_SERVICES=1" in ci
