#!/usr/bin/env bash
# The standard CPU sweep (issue 3): SmolLM2-135M-Instruct, passkey + multi-key NIAH + fact QA at
# 2048 tokens, ratios 2/4/8/16, every training-free baseline plus the full-context ceiling and the
# truncation floor, 50 samples each, teacher-forced log-likelihood scoring, bf16 weights (1.6x faster
# than fp32 on a CPU with avx512_bf16; pass --dtype float32 to override). Each sample is prefilled
# once for every method that can start from a prefill. Resumable: re-running skips finished
# configurations, and an unfinished task resumes at the sample where it stopped. Measured: 45 min on
# the 2-core CPU (benchmarks/results/eval_sweep/NOTE.md). Q-Filters and EHPC calibrate once per base model (seconds; cached
# under $CTXZIP_HOME/calibration). Outputs land in benchmarks/results/eval_sweep/.
#   bash benchmarks/eval_sweep.sh [extra python -m eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m eval \
  --compressor streaming_llm,snapkv,chunkkv,pyramidkv,selective_context,qfilters,ehpc \
  --base-model smollm2-135m-instruct \
  --tasks passkey,niah_multikey,fact_qa \
  --context-length 2048 --ratios 2,4,8,16 --num-samples 50 \
  --scoring loglik --dtype bfloat16 --output-dir benchmarks/results/eval_sweep "$@"
