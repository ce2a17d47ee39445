#!/usr/bin/env bash
# Compress once, answer many: one context, 10 prompts about it, each answered with 12 new tokens, timed end to end
# (compressing included) at 2k and 8k tokens, for SnapKV and truncation at 4x and 16x and any compressor folder
# given, beside the full cache built once and reused (prefix caching: the fair competitor), re-reading the context
# for every prompt, and the prompts alone. Timings are ratios within one run: run it alone on the machine.
#   bash benchmarks/answer_many.sh [compressor folder ...] [-- extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
compressors=(snapkv truncation)
while [ $# -gt 0 ] && [ "$1" != "--" ]; do compressors+=("$1"); shift; done
[ $# -gt 0 ] && shift
# 8000, not 8192: the chat template and the prompt must fit SmolLM2's 8192 positions beside the context
python -m ctxzip.eval --compressor "${compressors[@]}" --base-model smollm2-135m-instruct --dtype float32 \
  --scoring generate --max-new-tokens 12 --tasks passkey --context-length 2048 8000 --ratios 4 16 \
  --num-samples 1 --timing-samples 1 --n-prompts 10 --split test \
  --output-dir benchmarks/results/answer_many "$@"
