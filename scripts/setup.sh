#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Debian's packages for the tests: strace (tests/test_durability.py traces a real run's system
# calls) and fuse3 with libfuse3 (tests/test_faults.py mounts a file system that fails I/O).
missing=""
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
ldconfig -p 2>/dev/null | grep -q libfuse3.so.3 || missing="$missing libfuse3-3"
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
