#!/usr/bin/env bash
# Run the test suite in .venv (created on first use: CPU torch first, then the dev requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -r requirements-dev.txt
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests -q "$@"
