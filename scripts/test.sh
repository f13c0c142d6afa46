#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow-marked tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
