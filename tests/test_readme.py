"""The README is the front door: its configuration table must list every setting, and only those;
CI runs the README's test command with the services required."""

import re
import shlex
from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
CI_SCRIPT = README.parent / ".ci" / "run"
TEST_COMMAND = "./scripts/test.sh"


def test_configuration_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(THAW_[A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE))
    assert documented == {f"THAW_{name.upper()}" for name in Settings.model_fields}


def shell_commands(script: str) -> list[list[str]]:
    """Each command line of a shell script as its words, comments and blank lines left out."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def test_ci_runs_the_readme_test_command() -> None:
    assert TEST_COMMAND in README.read_text()
    commands = shell_commands(CI_SCRIPT.read_text())
    runs = [
        i for i, words in enumerate(commands) if words in ([TEST_COMMAND], ["exec", TEST_COMMAND])
    ]
    exports = [
        i
        for i, words in enumerate(commands)
        if words[0] == "export" and "THAW_REQUIRE_SERVICES=1" in words[1:]
    ]
    assert runs, f"{CI_SCRIPT} never runs {TEST_COMMAND}: {commands}"
    assert exports, f"{CI_SCRIPT} never exports THAW_REQUIRE_SERVICES=1: {commands}"
    assert min(exports) < min(runs), f"{CI_SCRIPT} exports THAW_REQUIRE_SERVICES=1 too late"
