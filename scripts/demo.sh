#!/usr/bin/env bash
# Command 1 of the README: install everything and run the end-to-end demo of the loop:
#   1. `rlhf demo`       the seeds' loop in one process, with quality figures (docs/demo-results.md);
#   2. `rlhf demo-loop`  the same loop as a service platform: the five services on localhost
#                        (SQLite, in-process event bus), simulated labelers ranking through the
#                        feedback API, the trainer's online-loop job (docs/services.md).
# Extra arguments go to `rlhf demo` (e.g. --quick, --out DIR, --data DIR); --quick also to demo-loop.
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF_EXTRAS="${RLHF_EXTRAS:-encoder}" scripts/setup.sh
.venv/bin/rlhf demo "$@"
loop_args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then loop_args+=(--quick); fi
done
exec .venv/bin/rlhf demo-loop "${loop_args[@]}"
