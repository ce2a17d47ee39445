#!/usr/bin/env bash
# Set up, then run the offline CPU test suite (arguments go to pytest).
#   CTXZIP_VENV / CTXZIP_LOCK: which environment and lock (see scripts/setup.sh).
#   CTXZIP_TEST_WORKERS: pytest-xdist workers (default: one per core; 0 runs in this process). Most tests
#   are bound by Python, not by arithmetic, so each worker gets one core's threads (tests/conftest.py); a test
#   file stays on one worker (its module fixtures are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${CTXZIP_VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -q -n "${CTXZIP_TEST_WORKERS:-auto}" --dist loadfile --durations=25 "$@"
