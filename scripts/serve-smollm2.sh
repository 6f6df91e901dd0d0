#!/usr/bin/env bash
# One command to chat with a real model: installs what SmolLM2-135M-Instruct needs (once), imports
# it into the registry (once; about a minute), and starts every service with the policy-server's
# OpenAI-compatible API on http://127.0.0.1:8000/v1 (extra arguments go to `rlhf up`).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF_EXTRAS="${RLHF_EXTRAS:-test,smollm2}" ./scripts/setup.sh
exec .venv/bin/rlhf up --policy smollm2 "$@"
