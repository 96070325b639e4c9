#!/usr/bin/env bash
# The GSM8K GRPO recipe on one GPU, in phases that each fit one device call (10 min), resuming
# from checkpoints between them. Inputs: a GSM8K folder (train.jsonl, test.jsonl) and the
# SmolLM2 HF folder. Outputs under $RUN; the figures go to benchmarks/RESULTS.md by hand.
#   benchmarks/gsm8k_gpu.sh base-eval|train|final-eval   (env: GSM8K, MODEL, RUN, BUDGET_S)
set -euo pipefail
GSM8K=${GSM8K:-/tmp/gsm8k} MODEL=${MODEL:-/tmp/smollm2} RUN=${RUN:-/tmp/run} BUDGET_S=${BUDGET_S:-500}
common=(-c configs/gsm8k-gpu.yaml --set "data.source=$GSM8K" --set "model.name_or_path=$MODEL"
        --set "data.output_dir=$RUN/data" --set "grpo.output_dir=$RUN/train" --set "eval.output_dir=$RUN/eval"
        --set grpo.save_steps=10)
case "$1" in
  base-eval)  python -m grpoflow.cli evaluate "${common[@]}" --model "base=$MODEL" > "$RUN/base-eval.json" ;;
  train)      # stops at the budget; the next call resumes from the newest checkpoint
              timeout --signal=KILL "$BUDGET_S" python -m grpoflow.cli train "${common[@]}" > "$RUN/train.json" \
                || echo "train: stopped at the ${BUDGET_S}s budget (exit $?); run again to resume" ;;
  final-eval) final=$(ls -d "$RUN"/train/*/final)
              python -m grpoflow.cli evaluate "${common[@]}" --model "base=$MODEL" --model "trained=$final" \
                > "$RUN/final-eval.json" ;;
  *) echo "usage: $0 base-eval|train|final-eval" >&2; exit 2 ;;
esac
