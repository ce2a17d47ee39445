#!/usr/bin/env bash
# The tests that touch transformers' model internals (caches, attention, generation, PEFT export, the
# KV baselines, gist, RCC, LCIRC, SoftPromptComp, InComeS, CSKV, the trainer compat overrides, the kvpress
# parity fixture, the GPU suite's CPU form: the GPU machines run transformers 5.17), on the floor of the
# supported range: requirements.floor.txt in .venv-floor.
set -euo pipefail
cd "$(dirname "$0")/.."
CTXZIP_VENV=${CTXZIP_VENV:-.venv-floor} CTXZIP_LOCK=requirements.floor.txt bash scripts/test.sh \
  tests/test_compat.py tests/test_cskv.py tests/test_cskv_post_rope.py tests/test_cskv_kernel.py tests/test_baselines.py \
  tests/test_gist.py tests/test_rcc.py tests/test_lcirc.py tests/test_softpromptcomp.py tests/test_incomes.py tests/test_memory.py tests/test_wrapper_hub.py tests/test_contract.py \
  tests/test_scoring.py tests/test_trainer_compat.py tests/test_baselines_extra.py tests/test_kvpress_parity.py \
  tests/test_gpu_suite.py tests/test_generation.py tests/test_families.py "$@"
