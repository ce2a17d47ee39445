#!/usr/bin/env bash
# The standard CPU sweep (issue 11): SmolLM2-135M-Instruct (embedded), fp32 weights, scored by greedy
# generation (what a user sees), every training-free baseline beside the full-context ceiling, the
# no-context floor and truncation, at 1k and 2k tokens and ratios 2/4/8/16. Four parts, each
# resumable (re-running skips finished configurations; an unfinished task resumes at its sample):
#   1. answers: passkey, multi-key NIAH, fact QA, and the continuation-perplexity row;
#   2. shared context (SCBench-style): 4 questions about different facts of ONE 1k context, answered
#      from one memory (multi-key NIAH, fact QA), accuracy by question, at 4x and 16x;
#   3. learned: trained compressors ($LEARNED, space-separated folders; default out/gist-smollm2) on the
#      answers part's 1k samples, those of $LEARNED_2K also at 2k, and in the shared-context mode, merged
#      with parts 1 and 2 into combined/;
#   4. timing: N=10 prompts about one context timed end to end (compress once + answers, the prefix
#      cache, re-reading), prompt and decode time. Run it with nothing else on the CPU.
# Parts 1 to 3 time nothing (--timing-samples 0), so they may share the machine. Outputs land in
# benchmarks/results/eval_sweep/{answers,shared,learned,combined,timing}/. Measured on the 2-core CPU: see NOTE.md there.
#   bash benchmarks/eval_sweep.sh [answers|shared|learned|timing|all] [extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
[ $# -gt 0 ] && shift
out=benchmarks/results/eval_sweep
baselines=(streaming_llm snapkv chunkkv pyramidkv selective_context qfilters ehpc)
# fp32: on a CPU without avx512_bf16 (this one) bf16 matmuls are 6x slower than fp32 (a 1k prefill: 49 s vs
# 8 s on one thread); pass --dtype bfloat16 where the CPU has it. 12 new tokens hold every answer (a 7-digit
# key, a word) and its end of turn.
common=(--base-model smollm2-135m-instruct --dtype float32 --scoring generate --max-new-tokens 12
        --ratios 2,4,8,16)
if [ "$part" = answers ] || [ "$part" = all ]; then
  python -m ctxzip.eval --compressor "${baselines[@]}" "${common[@]}" --tasks passkey niah_multikey fact_qa continuation \
    --context-length 1024 2048 --num-samples 10 --timing-samples 0 --output-dir "$out/answers" "$@"
fi
if [ "$part" = shared ] || [ "$part" = all ]; then
  python -m ctxzip.eval --compressor "${baselines[@]}" "${common[@]}" --tasks niah_multikey fact_qa --num-questions 4 \
    --context-length 1024 --ratios 4 16 --num-samples 5 --timing-samples 0 --output-dir "$out/shared" "$@"
fi
if [ "$part" = learned ] || [ "$part" = all ]; then
  # trained compressors (folders from the recipes: bash scripts/quickstart.sh for the gist one) on the same
  # samples, then one table with the baselines (their references are the answers part's)
  python -m ctxzip.eval --compressor ${LEARNED:-out/gist-smollm2} "${common[@]}" --no-references \
    --tasks passkey niah_multikey fact_qa continuation --context-length 1024 --num-samples 10 --timing-samples 0 \
    --output-dir "$out/learned" "$@"
  # at 2k, the compressors that take 2k-token contexts (the quickstart gist compressor's max_context_tokens is 2048
  # with the template's tokens: it refuses them), e.g. LEARNED_2K=out/cskv-smollm2
  if [ -n "${LEARNED_2K:-}" ]; then
    python -m ctxzip.eval --compressor $LEARNED_2K "${common[@]}" --no-references \
      --tasks passkey niah_multikey fact_qa continuation --context-length 2048 --num-samples 10 --timing-samples 0 \
      --output-dir "$out/learned_2k" "$@"
  fi
  # and the shared-context mode: one memory of each context answers 4 questions
  python -m ctxzip.eval --compressor ${LEARNED:-out/gist-smollm2} "${common[@]}" --no-references \
    --tasks niah_multikey fact_qa --num-questions 4 --context-length 1024 --num-samples 5 --timing-samples 0 \
    --output-dir "$out/learned_shared" "$@"
  parts=("$out/answers" "$out/learned" "$out/shared" "$out/learned_shared")
  [ -d "$out/learned_2k" ] && parts+=("$out/learned_2k")
  python -m ctxzip.eval --compare "${parts[@]}" --output-dir "$out/combined"
fi
if [ "$part" = timing ] || [ "$part" = all ]; then
  python -m ctxzip.eval --compressor "${baselines[@]}" "${common[@]}" --tasks passkey --context-length 1024 2048 \
    --num-samples 1 --timing-samples 1 \
    --n-prompts 10 --output-dir "$out/timing" "$@"
fi
