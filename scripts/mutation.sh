#!/usr/bin/env bash
# Mutation testing of the core (issue 28), with mutmut: per module, the fast tests that cover it
# are run against every mutant of it; prints the score per module and the surviving mutants.
# Not part of CI (minutes to hours). See docs/mutation.md for the scores and the equivalent
# mutants left alive.
#
#   scripts/mutation.sh                     # every module below
#   scripts/mutation.sh transitions states  # some of them
#
# Each module runs in its own scratch copy of the tree (THAW_MUTATION_DIR, default
# /tmp/thaw-mutation/<module>) so that mutmut's `mutants/` never lands in the checkout; a rerun
# reuses the results mutmut cached there for unchanged code. MUTATION_JOBS sets the parallel
# mutants (default: the number of cores). Tests that need Redis use THAW_TEST_REDIS_URL.
# `transitions` runs its time-zone test on Postgres too (THAW_TEST_POSTGRES_URL, as in tests/conftest.py):
# only a Postgres session in another time zone tells the CASE's typed time literal from an untyped one.
# mutmut keeps a mutant's verdict while its function is unchanged, even when tests were added:
# MUTATION_RECHECK=1 runs the last run's survivors again (after new tests meant to kill them).
# Where mutmut itself resets verdicts (a changed test selection), a plain rerun checks them.
# MUTATION_MINUTES=N stops each module's run after N minutes and scores what was checked.
# mutmut is not a project dependency: PYTHON names an interpreter that has it (mutmut 3) and the
# project's packages (default: .venv/bin/python).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python)
mutmut="$(dirname "$python")/mutmut"
scratch=${THAW_MUTATION_DIR:-/tmp/thaw-mutation}
jobs=${MUTATION_JOBS:-$(nproc)}

# name | files to mutate (globs, comma-separated) | tests (pytest arguments, ;-separated) |
# functions scored
# (a regular expression on function or method names; empty: all of the file's)
MODULES=(
  "transitions|service/jobs/transitions.py|tests/test_job_states.py;-k;not postgres or time_zone|"
  "states|service/jobs/states.py|tests/test_job_states.py;-k;not postgres|"
  "archive|service/datasets/ingest/archive.py|tests/security/test_archives_and_images.py|"
  "text|service/datasets/ingest/text.py|tests/test_text_datasets.py|"
  "resume|worker/engine/resume.py|tests/engine/test_checkpoint.py|"
  "checkpoint|worker/engine/checkpoint.py|tests/engine/test_checkpoint.py|"
  "plan|worker/engine/plan.py|tests/engine/test_plan.py|"
  "modalities|worker/engine/modalities/base.py,worker/engine/modalities/image/__init__.py,worker/engine/modalities/text/__init__.py|tests/engine/test_plan.py|check_settings"
  "answers|service/inference/service.py|tests/test_inference.py;-k;each_input_gets_its_own_top_labels or a_text_models_answers|fill_predictions|probabilities|_softmax"
  "auth|service/auth/*.py|tests/security/test_keys.py;tests/test_keys_cli.py;tests/fleet/test_shared_state.py|"
  "diagnosis|service/experiments/diagnosis.py|tests/test_experiments_diagnosis.py|"
  "statistics|service/experiments/statistics.py|tests/test_experiments_diagnosis.py|"
)

score_module() {
  local name=$1 files=$2 tests=$3 scored=$4
  local work=$scratch/$name
  mkdir -p "$work"
  # The tracked and untracked-but-not-ignored files: the tree as a fresh clone would have it.
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$root" && rsync -a --from0 --files-from=- ./ "$work/")
  local only tests_toml
  only=$(printf '"%s",' ${files//,/ })
  tests_toml=$(IFS=';'; printf '"%s",' $tests)
  cat >>"$work/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["service", "worker"]
only_mutate = [${only%,}]
also_copy = ["migrations", "alembic.ini", "README.md", "docs", "scripts", "bench"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-o", "addopts="]
pytest_add_cli_args_test_selection = [${tests_toml%,}]
process_isolation = "forkserver"
EOF
  echo "== $name: mutating $files with $tests" >&2
  local recheck=()
  if [ "${MUTATION_RECHECK:-0}" = 1 ] && [ -f "$work/results.txt" ]; then
    mapfile -t recheck < <(sed -n 's/^ *\(.*\): \(survived\|no tests\)$/\1/p' "$work/results.txt")
    echo "   rechecking ${#recheck[@]} survivors of the last run" >&2
  elif [ -n "$scored" ]; then
    # Only the scored functions' mutants (mutmut matches names with fnmatch): the rest of the
    # files would otherwise take the run's time, as "no tests" or timeouts that are not scored.
    local function
    for function in ${scored//|/ }; do
      recheck+=("*.x_${function}__mutmut_*" "*ǁ${function}__mutmut_*")
    done
  fi
  # In a fresh copy, mutmut 3.8's first stats run has failed here with a pytest usage error
  # (exit 4) that the same run does not repeat; hence one retry.
  # MUTATION_MINUTES stops a module's run after that long (its mutants left are "not checked").
  # Tests that start a Python subprocess (`service.cli`, an import check) import the mutated
  # tree too: mutmut runs from mutants/, and the environment it passes on names it.
  local status
  for try in 1 2; do
    status=0
    (cd "$work" && PYTHONPATH="$work/mutants" timeout "${MUTATION_MINUTES:-0}m" "$mutmut" run \
      --max-children "$jobs" ${recheck[@]+"${recheck[@]}"} >"$work/run.log" 2>&1) || status=$?
    [ "$status" = 0 ] && break
    [ "$status" = 124 ] && { echo "   stopped after ${MUTATION_MINUTES} minutes" >&2; break; }
    [ "$try" = 1 ] ||
      { tail -30 "$work/run.log" >&2; echo "$name: mutmut failed (log: $work/run.log)" >&2; return 1; }
  done
  (cd "$work" && "$mutmut" results --all true) >"$work/results.txt"
  "$python" - "$name" "$work/results.txt" "$scored" <<'EOF'
import re
import sys

name, path, scored = sys.argv[1], sys.argv[2], sys.argv[3]
statuses = {}
for line in open(path):
    mutant, _, status = line.strip().rpartition(": ")
    # mutmut names a function's mutants x_<name>__mutmut_N, a method's xǁ<Class>ǁ<name>__mutmut_N.
    if mutant and (not scored or re.search(rf"(x_|ǁ)({scored})__mutmut", mutant)):
        statuses[mutant] = status
dead = {"killed", "timeout", "caught by type check", "segfault"}
unscored = {"skipped", "not checked"}  # not checked: the run was stopped before them
killed = sum(status in dead for status in statuses.values())
survivors = sorted(m for m, status in statuses.items() if status not in dead | unscored)
total = killed + len(survivors)
unchecked = sum(status == "not checked" for status in statuses.values())
print(
    f"{name:12} {killed:4d}/{total:<4d} killed  {100 * killed / max(total, 1):5.1f} %"
    + (f"  ({unchecked} mutants not checked yet)" if unchecked else "")
)
for mutant in survivors:
    print(f"    {statuses[mutant]:10} {mutant}")
EOF
}

selected=("$@")
for entry in "${MODULES[@]}"; do
  IFS='|' read -r name files tests scored <<<"$entry"
  if [ ${#selected[@]} -eq 0 ] || [[ " ${selected[*]} " == *" $name "* ]]; then
    score_module "$name" "$files" "$tests" "$scored"
  fi
done
echo "(mutmut show <mutant> in $scratch/<module> prints a mutant's diff)"
