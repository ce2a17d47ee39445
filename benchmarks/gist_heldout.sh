#!/usr/bin/env bash
# The held-out yardstick of a trained gist compressor: questions of the retrieval mixture in wordings its training
# never saw (split test), on a corpus it never read (stdlib docstrings), by greedy generation, beside the full
# context (ceiling), no context (floor), truncation and SnapKV at the same ratio, 100 samples per cell (95% intervals
# in report.md). Resumable: a rerun skips finished configurations.
#   bash benchmarks/gist_heldout.sh [compressor folder or shipped name] [extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
compressor="${1:-out/gist-mixture}"
[ $# -gt 0 ] && shift
python -m ctxzip.eval --compressor "$compressor" snapkv --base-model smollm2-135m-instruct --dtype float32 \
  --scoring generate --max-new-tokens 16 --tasks retrieve_number retrieve_word multi_fact --context-length 1024 --ratios 4 \
  --num-samples 100 --source stdlib --split test --timing-samples 0 \
  --output-dir "benchmarks/results/gist_heldout/$(basename "$compressor")" "$@"
