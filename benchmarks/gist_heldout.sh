#!/usr/bin/env bash
# The held-out yardstick of learned memories: questions of the retrieval mixture in wordings no training uses
# (split test), on a corpus the training never reads (stdlib docstrings), at 1024 tokens and 4x, by greedy
# generation, 100 samples per cell (95% intervals in each report.md).
#   bash benchmarks/gist_heldout.sh bar [python -m ctxzip.eval flags]
#       the training-free bar: the full context (ceiling), no context (floor), truncation and SnapKV; later flags
#       win, e.g. --no_references --compressor streaming_llm selective_context qfilters --output-dir ...
#   bash benchmarks/gist_heldout.sh COMPRESSOR [flags]
#       a saved compressor (folder or shipped name) alone, then one report of it against every training-free
#       folder under the results (training_free*): the table "learned vs the best training-free method at the
#       same bytes". --learned_config KEY=VALUE changes how it reads (e.g. recent_tokens=144) and names its folder.
# Results go under $HELDOUT_RESULTS (default benchmarks/results/gist_heldout). Resumable: a rerun skips finished
# configurations.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: bash benchmarks/gist_heldout.sh bar|COMPRESSOR [flags]}"
shift
results="${HELDOUT_RESULTS:-benchmarks/results/gist_heldout}"
common=(--base-model smollm2-135m-instruct --dtype float32 --scoring generate --max-new-tokens 16
        --tasks retrieve_number retrieve_word multi_fact --context-length 1024 --ratios 4 --num-samples 100
        --source stdlib --split test --timing-samples 0)
if [ "$target" = bar ]; then
  python -m ctxzip.eval --compressor snapkv "${common[@]}" --output-dir "$results/training_free" "$@"
else
  # --learned_config KEY=VALUE ... names the results folder too: out/gist-8x with recent_tokens=144 writes
  # gist-8x-recent_tokens144 beside gist-8x
  name="$(basename "$target")" settings=0
  for arg in "$@"; do
    case "$arg" in
      --learned_config|--learned-config) settings=1 ;;
      --*) settings=0 ;;
      *) if [ "$settings" = 1 ]; then name+="-${arg//=/}"; fi ;;
    esac
  done
  python -m ctxzip.eval --compressor "$target" --no_references "${common[@]}" --output-dir "$results/$name" "$@"
  python -m ctxzip.eval --compare "$results"/training_free* "$results/$name" \
    --output-dir "$results/$name-vs-training-free"
fi
