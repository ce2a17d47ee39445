#!/usr/bin/env bash
# Set up, then train + evaluate + save a gist compressor on the embedded SmolLM2 (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
accelerate launch --config_file accelerate_configs/cpu.yaml recipes/gist.py \
  --config recipes/configs/gist/quickstart.yaml "$@"
