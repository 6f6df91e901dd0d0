#!/usr/bin/env bash
# Command 2 of the README: install what the tests need, start what they need, run the whole suite.
# Extra arguments go to pytest (e.g. -m "not slow", -k ppo).
#
# The integration tests need a Kafka broker and PostgreSQL: scripts/infra.sh starts both under
# .cache/infra/ and they are stopped again on exit, unless they were already running before
# (then they are left for whoever started them). The deployment tests need Prometheus
# (scripts/prometheus.sh installs Debian's package) and helm with a Kubernetes control plane
# (scripts/k8s.sh builds them once, then starts the cluster under .cache/k8s/ and stops it on exit
# in the same way). The labeling page's browser tests need Chromium, its driver and axe-core
# (scripts/browser-deps.sh installs them). RLHF_TEST_INFRA=none installs and starts nothing; the
# integration tests are then skipped unless RLHF_TEST_KAFKA_BOOTSTRAP / RLHF_TEST_DATABASE_URL
# point at servers of your own, the deployment tests unless the programs are already built and
# installed, and the browser tests unless Chromium is installed.
#
# The fault tests (marker faults, docs/reliability.md) start a broker and a durable PostgreSQL of
# their own and crash them; their table (tried, held, lost, duplicated) is printed at the end and
# kept in .cache/fault-report.md (RLHF_FAULT_REPORT names another file). -m "not faults" skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RLHF_TEST_ARTIFACTS="${RLHF_TEST_ARTIFACTS:-$PWD/.cache/test-artifacts}"
echo "[test] screenshots and other test artifacts go to $RLHF_TEST_ARTIFACTS" >&2

stop_on_exit=()  # the scripts whose servers this run started: stopped again on exit
trap 'for s in "${stop_on_exit[@]}"; do scripts/$s stop || true; done' EXIT
if [ "${RLHF_TEST_INFRA:-}" != "none" ]; then
  # the labeling page's browser tests: Debian's chromium and chromium-driver, axe-core from npm
  RLHF_AXE_JS="$(scripts/browser-deps.sh)"
  export RLHF_AXE_JS RLHF_TEST_REQUIRE_BROWSER=1  # a missing browser fails them instead of skipping
  # the deployment checks (tests/deploy): Debian's Prometheus, and helm with a Kubernetes control
  # plane built from the Go module proxy (the first time only: cached in ~/.cache/rlhf/k8s)
  scripts/prometheus.sh install
  scripts/k8s.sh build
  if ! scripts/infra.sh status >/dev/null 2>&1; then
    stop_on_exit+=(infra.sh)
  fi
  scripts/infra.sh start
  # shellcheck source=/dev/null
  source .cache/infra/env
  if ! scripts/k8s.sh status >/dev/null 2>&1; then
    stop_on_exit+=(k8s.sh)
  fi
  scripts/k8s.sh start
  # shellcheck source=/dev/null
  source .cache/k8s/env
fi

export RLHF_FAULT_REPORT="${RLHF_FAULT_REPORT:-$PWD/.cache/fault-report.md}"
rm -f "$RLHF_FAULT_REPORT"

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ -s "$RLHF_FAULT_REPORT" ]; then
  echo "fault table (docs/reliability.md), also in $RLHF_FAULT_REPORT:" >&2
  sed -n '/^|/p' "$RLHF_FAULT_REPORT" >&2
fi
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
