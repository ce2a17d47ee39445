#!/usr/bin/env bash
# Set up, then train + evaluate + save a gist compressor on the embedded SmolLM2 (CPU, minutes); its held-out table
# scores the shipped compressor (ctxzip/gist-smollm2-135m) on the same rows, beside this run's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
accelerate launch --config_file accelerate_configs/cpu.yaml recipes/gist.py \
  --config recipes/configs/gist/quickstart.yaml --eval_compare_with ctxzip/gist-smollm2-135m "$@"
