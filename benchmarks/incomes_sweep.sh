#!/usr/bin/env bash
# InComeS on the 2-core CPU (issue 15): SmolLM2-135M-Instruct (embedded), fp32, rank-16 LoRA on every layer.
#   1. train recipes/configs/incomes/quickstart.yaml for 500 steps twice (offline counterfactual edits, batches of 4
#      queries reading one pool of 8 or 16 edits, a quarter of the queries unrelated questions): the teacher of an
#      unrelated query reads the row's edit in context (--locality_teacher edit, the paper's) or the query alone
#      (--locality_teacher base). Each recipe's own table compares it with the untrained compressor at pools of 1
#      and 8 edits (train_<variant>.log).
#   2. python -m ctxzip.eval --tasks edits: efficacy / generalisation / locality on held-out subjects (and held-out locality
#      questions) at pools of 1, 8, 32 and 128 edits, by teacher-forced token accuracy and by greedy generation, the
#      trained and the untrained compressor beside in-context editing (all the pool's edits in the context) and no
#      editing; bytes held per edit.
# Outputs: benchmarks/results/incomes_cpu/.
#   bash benchmarks/incomes_sweep.sh [train|eval|all] [extra python -m ctxzip.eval flags]
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
[ $# -gt 0 ] && shift
out=benchmarks/results/incomes_cpu
mkdir -p "$out"
for teacher in edit base; do
  trained=out/incomes-500-$teacher
  if [ "$part" = train ] || [ "$part" = all ]; then
    python recipes/incomes.py --config recipes/configs/incomes/quickstart.yaml --max_steps 500 --save_steps 100 \
      --locality_teacher "$teacher" --output_dir "$trained" 2>&1 | tr '\r' '\n' > "$out/train_$teacher.full.log"
    # the loss lines and the tables, without progress bars and warnings
    grep -aE "^\{'loss'|^\{'train_runtime'|^\||^held-out|^reload check" "$out/train_$teacher.full.log" \
      > "$out/train_$teacher.log" || true
    rm -f "$out/train_$teacher.full.log"
  fi
  if [ "$part" = eval ] || [ "$part" = all ]; then
    python -m ctxzip.eval --compressor "$trained" incomes --tasks edits --pool-sizes 1 8 32 128 --num-samples 16 \
      --max-new-tokens 16 --dtype float32 --output-dir "$out/edits_locality_teacher_$teacher" --no-progress "$@"
  fi
done
