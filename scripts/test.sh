#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow-marked tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m ruff check .
# Two workers, one test file each at a time (module-scoped fixtures are built once): the
# suite is mostly separate trainer processes waiting on each other, 280 s instead of 420 s.
.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
