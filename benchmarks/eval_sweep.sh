#!/usr/bin/env bash
# The standard CPU sweep (issue 3): SmolLM2-135M-Instruct, passkey + multi-key NIAH + fact QA at
# 2048 tokens, ratios 2/4/8/16, every training-free baseline plus the full-context ceiling and the
# truncation floor, 50 samples each, teacher-forced log-likelihood scoring. Resumable: re-running
# skips finished configurations. Q-Filters and EHPC calibrate once per base model (seconds; cached
# under $CTXZIP_HOME/calibration). Outputs land in benchmarks/results/eval_sweep/.
#   bash benchmarks/eval_sweep.sh [extra python -m eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m eval \
  --compressor streaming_llm,snapkv,chunkkv,pyramidkv,selective_context,qfilters,ehpc \
  --base-model smollm2-135m-instruct \
  --tasks passkey,niah_multikey,fact_qa \
  --context-length 2048 --ratios 2,4,8,16 --num-samples 50 \
  --scoring loglik --output-dir benchmarks/results/eval_sweep "$@"
