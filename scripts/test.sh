#!/usr/bin/env bash
# Command 2 of the README: install what the tests need, start what they need, run the whole suite.
# Extra arguments go to pytest (e.g. -m "not slow", -k ppo).
#
# The integration tests need a Kafka broker and PostgreSQL: scripts/infra.sh starts both under
# .cache/infra/ and they are stopped again on exit, unless they were already running before
# (then they are left for whoever started them). RLHF_TEST_INFRA=none starts nothing; the
# integration tests are then skipped unless RLHF_TEST_KAFKA_BOOTSTRAP / RLHF_TEST_DATABASE_URL
# point at servers of your own.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

if [ "${RLHF_TEST_INFRA:-}" != "none" ]; then
  if ! scripts/infra.sh status >/dev/null 2>&1; then
    trap 'scripts/infra.sh stop || true' EXIT
  fi
  scripts/infra.sh start
  # shellcheck source=/dev/null
  source .cache/infra/env
fi

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
