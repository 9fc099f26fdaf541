#!/usr/bin/env bash
# Run the test suite in .venv (created on first use: CPU torch first, then the dev requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh requirements-dev.txt
.venv/bin/lint-imports --no-cache  # the layers of lcm_utils (.importlinter); a circle or an upward import fails here
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests -q "$@"
