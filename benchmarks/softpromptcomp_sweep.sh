#!/usr/bin/env bash
# SoftPromptComp (our interpretation) on the 2-core CPU (issue 16): SmolLM2-135M-Instruct (embedded, frozen), fp32.
#   1. train the four ablations with recipes/configs/softpromptcomp/quickstart.yaml (256-token contexts, summaries
#      of at most 32 tokens written by the model itself, m = 8 soft vectors, fact QA + passkey + continuation, 100
#      steps): both sources weighted (one gate per source: the config as is), both unweighted (--weighting none),
#      summary only and soft vectors only (one gate each). The summaries are cached under $CTXZIP_HOME/summaries,
#      so the first run writes them and the others read them.
#   2. fact QA and multi-key NIAH by generation at 512 and 2048 tokens, the four ablations beside the full context,
#      no context and truncation / SnapKV at about SoftPromptComp's number of memory positions (ratio 8 at 512
#      tokens, 32 at 2048; those hold ~20x its bytes: at its bytes a K/V cache holds 2 positions, less than the
#      chat template). Compression time includes writing the summary.
# Every part resumes. Outputs: benchmarks/results/softpromptcomp_cpu/.
#   bash benchmarks/softpromptcomp_sweep.sh [train|eval|all] [extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
[ $# -gt 0 ] && shift
out=benchmarks/results/softpromptcomp_cpu
config=recipes/configs/softpromptcomp/quickstart.yaml
base=out/softpromptcomp-smollm2
if [ "$part" = train ] || [ "$part" = all ]; then
  python recipes/softpromptcomp.py --config "$config"
  python recipes/softpromptcomp.py --config "$config" --weighting none --output_dir "$base-unweighted"
  python recipes/softpromptcomp.py --config "$config" --sources summary --output_dir "$base-summary"
  python recipes/softpromptcomp.py --config "$config" --sources soft --output_dir "$base-soft"
fi
if [ "$part" = eval ] || [ "$part" = all ]; then
  methods=("$base" "$base-unweighted" "$base-summary" "$base-soft" snapkv)
  common=(--dtype float32 --scoring generate --timing-samples 0 --max-new-tokens 12 --tasks fact_qa niah_multikey)
  python -m ctxzip.eval --compressor "${methods[@]}" "${common[@]}" --context-length 512 --ratios 8 --num-samples 8 \
    --output-dir "$out/L512" "$@"
  python -m ctxzip.eval --compressor "${methods[@]}" "${common[@]}" --context-length 2048 --ratios 32 --num-samples 8 \
    --output-dir "$out/L2048" "$@"
  # the training-free methods at each ablation's achieved ratio (both 8.4 / 32.4, summary only 9.6 / 37,
  # soft only 16.8 / 64.8), Selective Context (text, like the summary) beside truncation and SnapKV
  baselines=(--compressor truncation snapkv selective_context --base-model smollm2-135m-instruct)
  python -m ctxzip.eval "${baselines[@]}" "${common[@]}" --context-length 512 --ratios 8.4 9.6 16.8 --num-samples 8 \
    --output-dir "$out/L512_matched" "$@"
  python -m ctxzip.eval "${baselines[@]}" "${common[@]}" --context-length 2048 --ratios 32.4 37 64.8 --num-samples 8 \
    --output-dir "$out/L2048_matched" "$@"
fi
