#!/usr/bin/env bash
# Command 1 of the README: install everything and run the end-to-end demo of the loop.
# Extra arguments go to `rlhf demo` (e.g. --quick, --out DIR, --data DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF_EXTRAS="${RLHF_EXTRAS:-encoder}" scripts/setup.sh
exec .venv/bin/rlhf demo "$@"
