#!/usr/bin/env bash
# RCC on the 2-core CPU (issue 13): SmolLM2-135M-Instruct (embedded), fp32, scored by greedy generation.
#   1. train: the quickstart recipe at rates c = 4, 8, 32 (W = 128, 150 steps, LoRA encoder + decoder,
#      reconstruction + passkey SFT on 256-token contexts); c = 8 is recipes/configs/rcc/quickstart.yaml as is.
#   2. reconstruction: held-out text (256 tokens, a 64-token span cued by its first 10-20 tokens): BLEU-4 and
#      exact match of the rest of the span, for the three rates beside truncation and SnapKV at each rate's
#      achieved ratio (the same memory: every method here holds a KV cache of as many positions), the full
#      context and no context.
#   3. passkey: 2k, 8k and 32k-token contexts (32k is beyond the base model's 8192 positions: RCC and truncation
#      run there, the full context and SnapKV cannot), RCC c = 8 and c = 32 beside truncation and SnapKV at
#      ratios 8 and 32 and at exactly RCC's memory (its achieved ratios: 7.4 / 23.55 at 2k, 7.8 / 29.3 at 8k,
#      8.0 / 31.3 at 32k, below c since the template prefix is kept whole) and the references.
# Every part resumes (finished configurations are skipped). Outputs: benchmarks/results/rcc_cpu/.
#   bash benchmarks/rcc_sweep.sh [train|reconstruction|passkey|all] [extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
[ $# -gt 0 ] && shift
out=benchmarks/results/rcc_cpu
common=(--dtype float32 --scoring generate --timing-samples 0 --max-new-tokens 12)
if [ "$part" = train ] || [ "$part" = all ]; then
  for rate in 4 8 32; do
    dir=out/rcc-smollm2; [ "$rate" = 8 ] || dir=out/rcc-smollm2-c$rate
    python recipes/rcc.py --config recipes/configs/rcc/quickstart.yaml --rate "$rate" --output_dir "$dir" \
      --num_eval_samples 10
  done
fi
if [ "$part" = reconstruction ] || [ "$part" = all ]; then
  # achieved ratios at 256 tokens + the 24-token template prefix: c=4 3.18, c=8 5.0, c=32 8.75
  python -m ctxzip.eval --compressor out/rcc-smollm2-c4 out/rcc-smollm2 out/rcc-smollm2-c32 truncation snapkv \
    "${common[@]}" --tasks reconstruction --context-length 256 --ratios 3.18 5 8.75 --num-samples 12 \
    --output-dir "$out/reconstruction" "$@"
fi
if [ "$part" = passkey ] || [ "$part" = all ]; then
  # fewer samples at the longer lengths: on 2 CPU cores a 32k-token sample takes minutes per method
  for run in 2048:8 8192:6 32768:3; do
    length=${run%%:*}
    python -m ctxzip.eval --compressor out/rcc-smollm2 out/rcc-smollm2-c32 truncation snapkv "${common[@]}" \
      --tasks passkey --context-length "$length" --ratios 8 32 --num-samples "${run##*:}" \
      --output-dir "$out/passkey_L$length" "$@"
  done
  # 8192 tokens + the prompt do not fit SmolLM2's 8192 positions, so at 8192 only RCC and truncation run: the full
  # context and SnapKV are measured at 8000 tokens (the longest that fits with the prompt's margin)
  python -m ctxzip.eval --compressor snapkv --base-model smollm2-135m-instruct "${common[@]}" --tasks passkey \
    --context-length 8000 --ratios 8 32 --num-samples 6 --output-dir "$out/passkey_L8000" "$@"
  # the same memory as RCC exactly: truncation / SnapKV at RCC's achieved ratios at each length
  for run in 2048:8:truncation,snapkv:7.4,23.55 8192:6:truncation:7.8,29.3 8000:6:snapkv:7.8,29.3 \
             32768:3:truncation:8.0,31.3; do
    IFS=: read -r length samples methods ratios <<< "$run"
    python -m ctxzip.eval --compressor "$methods" --base-model smollm2-135m-instruct "${common[@]}" --tasks passkey \
      --context-length "$length" --ratios "$ratios" --num-samples "$samples" \
      --output-dir "$out/passkey_matched_L$length" "$@"
  done
  python -m ctxzip.eval --compare "$out"/passkey_L2048 "$out"/passkey_L8000 "$out"/passkey_L8192 "$out"/passkey_L32768 \
    "$out"/passkey_matched_L* --output-dir "$out/passkey"
fi
