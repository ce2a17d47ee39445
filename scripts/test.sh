#!/usr/bin/env bash
# Set up, then run the offline CPU test suite (arguments go to pytest).
#   CTXZIP_VENV / CTXZIP_LOCK: which environment and lock (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${CTXZIP_VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -q --durations=25 "$@"
