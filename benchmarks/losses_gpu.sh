#!/usr/bin/env bash
# Issue #27's GPU run: the GSM8K recipe with loss_type dapo, cispo and sapo side by side on one card,
# benchmarks/variants_gpu.sh's "losses" set (its environment: STEPS, EVAL_STEPS, EVAL_PROMPTS, MEMORY,
# DEADLINE_S, WORK, OUT); the figures come back in $OUT/losses.tgz.
#   OUT=$OUT DEADLINE_S=540 bash benchmarks/losses_gpu.sh
VARIANTS=losses exec bash "$(dirname "$0")/variants_gpu.sh"
