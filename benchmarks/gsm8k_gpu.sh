#!/usr/bin/env bash
# The GSM8K GRPO recipe on one GPU, in phases that each fit one device call (10 min), resuming
# from checkpoints between them. Inputs: a GSM8K folder (train.jsonl, test.jsonl) and the
# SmolLM2 HF folder. Outputs under $RUN; the figures go to benchmarks/RESULTS.md by hand.
#   benchmarks/gsm8k_gpu.sh train | eval-base | eval-trained | report
#   env: GSM8K, MODEL, RUN, BUDGET_S (train: checkpoint and stop after the step that ends past this
#        many seconds; the next call resumes there), OUT (report: where the summary and curve go)
# Each model is evaluated once (stages/evaluate.py keeps figures per model), so eval-base can
# run beside training, and eval-trained reuses the base figures for the side-by-side table.
set -euo pipefail
GSM8K=${GSM8K:-/tmp/gsm8k} MODEL=${MODEL:-/tmp/smollm2} RUN=${RUN:-/tmp/run} BUDGET_S=${BUDGET_S:-500}
mkdir -p "$RUN"
common=(-c configs/gsm8k-gpu.yaml --set "data.source=$GSM8K" --set "model.name_or_path=$MODEL"
        --set "data.output_dir=$RUN/data" --set "grpo.output_dir=$RUN/train" --set "eval.output_dir=$RUN/eval"
        --set grpo.save_steps=25)
case "${1:-}" in
  train)        python -m grpoflow.cli train "${common[@]}" --stop-after "$BUDGET_S" > "$RUN/train.json" \
                  2>> "$RUN/train.log"
                grep -o '"finished": [a-z]*' "$RUN/train.json" ;;
  eval-base)    python -m grpoflow.cli evaluate "${common[@]}" --model "base=$MODEL" > "$RUN/eval-base.json" \
                  2>> "$RUN/eval.log" ;;
  eval-trained) final=$(ls -d "$RUN"/train/*/final)
                python -m grpoflow.cli evaluate "${common[@]}" --model "base=$MODEL" --model "trained=$final" \
                  > "$RUN/eval-trained.json" 2>> "$RUN/eval.log" ;;
  report)       python benchmarks/gsm8k_report.py --run "$RUN" ${OUT:+--out "$OUT"} ;;
  *) echo "usage: $0 train|eval-base|eval-trained|report" >&2; exit 2 ;;
esac
