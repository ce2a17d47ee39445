#!/usr/bin/env bash
# Download the wheels the GPU suite needs that the GPU machine lacks (it reaches no package registry).
#
# The GPU machine has Python 3.12, torch, transformers, accelerate, peft, triton, safetensors,
# tokenizers, numpy, pandas, pyarrow, tensorboard; not liger-kernel (section 3's fused loss),
# datasets + trl (section 4 imports the recipe and builds its data), gguf (section 4 converts the
# embedded GGUF). Dependencies that may be missing there come along; run_suite.py unpacks only the
# wheels whose modules the machine cannot import, so carrying an extra one never shadows its own.
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # cp312, manylinux x86_64 -> benchmarks/gpu/.cache/wheels
#   PYVER=3.11 DEST=/tmp/wheels311 bash benchmarks/gpu/fetch_wheels.sh   # same set for a local 3.11 rehearsal
#
# Versions are pinned: the suite was rehearsed on CPU with exactly these next to transformers 5.17,
# huggingface_hub 1.x and triton 3.6 (the GPU machine's versions). About 4.5 MiB in all.
set -euo pipefail
cd "$(dirname "$0")"
PYVER=${PYVER:-3.12}
DEST=${DEST:-.cache/wheels}
PIP=${PIP:-}
if [ -z "$PIP" ]; then
  if [ -x ../../.venv/bin/python ]; then PIP="../../.venv/bin/python -m pip"; else PIP="python3 -m pip"; fi
fi
ABI="cp${PYVER/./}"
PACKAGES=(
  liger-kernel==0.8.5
  datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
  trl==1.16.0
  gguf==0.19.0
  requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3 idna==3.20 certifi==2026.10.19.post1
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# --no-deps: exactly this list (the machine's own torch / transformers must not be replaced).
$PIP download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${PACKAGES[@]}"
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
