#!/usr/bin/env bash
# Command 2 of the README: install what the tests need, start what they need, run the whole suite.
# Extra arguments go to pytest (e.g. -m "not slow", -k ppo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The suite needs no external server yet; the services' integration tests will start a Kafka
# broker and PostgreSQL here (and stop them on exit).
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
