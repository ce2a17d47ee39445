#!/usr/bin/env bash
# LCIRC / QD-LCIRC on the 2-core CPU (issue 14): SmolLM2-135M-Instruct (embedded, frozen), fp32.
#   1. train: recipes/configs/lcirc/quickstart.yaml (LCIRC: 512-token contexts, 64-token segments, K = 16, 2 Perceiver
#      layers, 11 gated blocks, continuation loss, 200 steps), then quickstart_qd.yaml (QD-LCIRC from that export:
#      passkey + fact QA, answer-only loss, 150 steps).
#   2. continuation: teacher-forced perplexity of the 32 tokens that follow a 512-token (the training length) and a
#      2048-token context, reading LCIRC's memory, beside the full context, no context, and truncation / SnapKV at
#      the same memory bytes (ratio 80: one position of SmolLM2's K/V cache, 30 layers x 3 heads x 64 x 2 fp32
#      values = 46,080 bytes, holds as much as 20 latents of 576 fp32 values, and LCIRC keeps 16 latents per 64
#      tokens) and at about LCIRC's number of memory positions (ratio 4: 20x LCIRC's bytes); and at 16k tokens
#      (beyond the base model's positions: LCIRC, truncation and no context only).
#   3. retrieval by generation: multi-key NIAH and fact QA at 2k and 16k tokens (16k is beyond SmolLM2's 8192
#      positions: only LCIRC, QD-LCIRC, truncation and no context run there); QD-LCIRC's memory is made per question.
# Every part resumes (finished configurations are skipped). Outputs: benchmarks/results/lcirc_cpu/.
#   bash benchmarks/lcirc_sweep.sh [train|continuation|retrieval|all] [extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
[ $# -gt 0 ] && shift
out=benchmarks/results/lcirc_cpu
common=(--dtype float32 --timing-samples 0 --max-new-tokens 12)
if [ "$part" = train ] || [ "$part" = all ]; then
  python recipes/lcirc.py --config recipes/configs/lcirc/quickstart.yaml
  python recipes/lcirc.py --config recipes/configs/lcirc/quickstart_qd.yaml
fi
if [ "$part" = continuation ] || [ "$part" = all ]; then
  python -m ctxzip.eval --compressor out/lcirc-smollm2 snapkv "${common[@]}" --tasks continuation \
    --context-length 512 2048 --ratios 4 80 --num-samples 12 --output-dir "$out/continuation" "$@"
  # 16k tokens, beyond SmolLM2's positions: LCIRC, truncation and no context (the full context cannot run)
  python -m ctxzip.eval --compressor out/lcirc-smollm2 "${common[@]}" --tasks continuation --context-length 16384 \
    --ratios 4 80 --num-samples 6 --output-dir "$out/continuation_L16384" "$@"
fi
if [ "$part" = retrieval ] || [ "$part" = all ]; then
  python -m ctxzip.eval --compressor out/lcirc-smollm2 out/qd-lcirc-smollm2 snapkv "${common[@]}" --scoring generate \
    --tasks niah_multikey fact_qa --context-length 2048 --ratios 4 80 --num-samples 8 \
    --output-dir "$out/retrieval_L2048" "$@"
  # fewer samples at 16k: on 2 CPU cores every method reads 16k tokens per sample
  python -m ctxzip.eval --compressor out/lcirc-smollm2 out/qd-lcirc-smollm2 "${common[@]}" --scoring generate \
    --tasks niah_multikey fact_qa --context-length 16384 --ratios 4 80 --num-samples 4 \
    --output-dir "$out/retrieval_L16384" "$@"
fi
