#!/usr/bin/env bash
# Create .venv and install the project with the extras named in $RLHF_EXTRAS (default: test).
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
  touch "$stamp"
fi
