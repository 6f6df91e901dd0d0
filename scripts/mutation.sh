#!/usr/bin/env bash
# Mutation testing of the RL equations: mutmut mutates rlhf/algos/ one small change at a time and
# runs tests/algos/ against each mutant; a mutant no test fails on "survived". Not part of CI
# (hours on two cores). Results and the survivors judged harmless: docs/ppo.md.
#
#   ./scripts/mutation.sh            # mutate, test, then print the results
#   ./scripts/mutation.sh NAME...    # test those mutants again (e.g. survivors, after new tests)
#
# It works on a copy of the tracked files in .cache/mutation/ (mutmut writes its mutants/ there
# and keeps its results between runs), at low priority, one test process at a time.
# Needs mutmut (pip install "rlhf-platform[mutation]"); PYTHON names the interpreter (default:
# python). Remove .cache/mutation/ to start afresh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/.cache/mutation"
mkdir -p "$work"
# the tracked tree as it is now (edits included); mutmut's mutants/ folder is kept
(cd "$root" && git ls-files -z --cached --others --exclude-standard -- rlhf tests pyproject.toml) |
  (cd "$root" && xargs -0 cp --parents -t "$work")
cat >"$work/setup.cfg" <<'EOF'
[mutmut]
source_paths = rlhf/algos/
also_copy = rlhf/
pytest_add_cli_args_test_selection = tests/algos/
pytest_add_cli_args = -p no:cacheprovider
process_isolation = forkserver
EOF
cd "$work"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
py="${PYTHON:-python}"
nice -n 10 "$py" -m mutmut run --max-children 1 "$@"
"$py" -m mutmut export-cicd-stats
cat mutants/mutmut-cicd-stats.json
"$py" -m mutmut results
