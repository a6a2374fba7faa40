#!/usr/bin/env bash
# Installs what the tests need into .venv, then runs everything: lint, format, types, tests.
# Extra arguments go to pytest (e.g. `./scripts/test.sh -k e2e -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv
if ! log=$(.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1); then
  echo "$log" | grep -v '^WARNING: Location' >&2
  exit 1
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/pytest "$@"
