#!/usr/bin/env bash
# The benchmark suite, in one command: ours vs trl 1.12 side by side (see docs/benchmarks.md).
#
#   bench/run.sh                 # full run on the CPU (about 20 minutes on 2 cores)
#   bench/run.sh --quick         # seconds-long smoke run of every part on a tiny model
#   bench/run.sh --device cuda   # on a GPU: 12 layers x 768, bf16 sides as well
#   bench/run.sh --help          # all options (--data DIR, --threads N, --repeats N, --name, --only)
#
# Builds both environments first: .venv (ours, by scripts/setup.sh) and bench/.venv-trl (trl 1.12.0
# with the same torch / transformers pins, from bench/requirements-trl.txt). Re-running is cheap:
# each install is skipped while its requirement files are unchanged.
# Writes bench/results/<name>.json and bench/results/<name>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

./scripts/setup.sh

TRL_VENV=bench/.venv-trl
if [ ! -x "$TRL_VENV/bin/python" ]; then
  echo "[bench] creating $TRL_VENV" >&2
  "$PY" -m venv "$TRL_VENV"
fi
stamp="$TRL_VENV/.installed-$(cat bench/requirements-trl.txt bench/constraints-trl.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[bench] installing trl 1.12.0 and its pinned dependencies into $TRL_VENV (torch is large: a few minutes the first time)" >&2
  "$TRL_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r bench/requirements-trl.txt -c bench/constraints-trl.txt
  rm -f "$TRL_VENV"/.installed-*
  touch "$stamp"
fi

exec .venv/bin/python bench/run.py --ours-python .venv/bin/python --trl-python "$TRL_VENV/bin/python" "$@"
