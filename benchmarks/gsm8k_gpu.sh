#!/usr/bin/env bash
# A GRPO recipe on one GPU (the GSM8K one by default), in phases that each fit one device call
# (10 min), resuming from checkpoints between them. Inputs: a GSM8K folder (train.jsonl, test.jsonl)
# and the SmolLM2 HF folder. Outputs under $RUN; the figures go to benchmarks/RESULTS.md by hand.
#   bash benchmarks/gsm8k_gpu.sh train | eval-base | eval-trained | report
#   CONFIG=configs/chain-sum-gpu.yaml RUN=/tmp/chain bash benchmarks/gsm8k_gpu.sh train
#   env: CONFIG (default configs/gsm8k-gpu.yaml; a config whose data.source is not gsm8k keeps its
#        own), GSM8K, MODEL, RUN, BUDGET_S (train: checkpoint and stop after the step that ends past
#        this many seconds; the next call resumes there), OUT and NAME (report: where the summary
#        and curves go, and their name), SETS (more --set KEY=VALUE words for every phase, e.g.
#        "--set rollout.gpu_memory_utilization=0.15" when several runs share the card)
# Each model is evaluated once (stages/evaluate.py keeps figures per model), so eval-base can
# run beside training, and eval-trained reuses the base figures for the side-by-side table.
set -euo pipefail
GSM8K=${GSM8K:-/tmp/gsm8k} MODEL=${MODEL:-/tmp/smollm2} RUN=${RUN:-/tmp/run} BUDGET_S=${BUDGET_S:-500}
CONFIG=${CONFIG:-configs/gsm8k-gpu.yaml} NAME=${NAME:-gsm8k}
mkdir -p "$RUN"
# the code sandbox (the python tool's recipe) takes bubblewrap first: the one stage_gpu.sh unpacked, if any
[ -x /tmp/bw/usr/bin/bwrap ] && export PATH=/tmp/bw/usr/bin:$PATH
# the packaged GSM8K is a pip package the GPU machine lacks: its files stand in (train and warm-up)
source=(--set "data.source=$GSM8K")
grep -q '^  source: reasoning_gym' "$CONFIG" && source=(--set "grpo.warmup.source=$GSM8K")
common=(-c "$CONFIG" "${source[@]}" --set "model.name_or_path=$MODEL"
        --set "data.output_dir=$RUN/data" --set "grpo.output_dir=$RUN/train" --set "eval.output_dir=$RUN/eval"
        ${SETS:-})
case "${1:-}" in
  train)        python -m grpoflow.cli train "${common[@]}" --stop-after "$BUDGET_S" > "$RUN/train.json" \
                  2>> "$RUN/train.log"
                grep -o '"finished": [a-z]*' "$RUN/train.json" ;;
  eval-base)    python -m grpoflow.cli evaluate "${common[@]}" --model "base=$MODEL" > "$RUN/eval-base.json" \
                  2>> "$RUN/eval.log" ;;
  eval-trained) final=$(ls -d "$RUN"/train/*/final)
                python -m grpoflow.cli evaluate "${common[@]}" --model "base=$MODEL" --model "trained=$final" \
                  > "$RUN/eval-trained.json" 2>> "$RUN/eval.log" ;;
  report)       python benchmarks/gsm8k_report.py --run "$RUN" --name "$NAME" ${OUT:+--out "$OUT"} ;;
  *) echo "usage: $0 train|eval-base|eval-trained|report" >&2; exit 2 ;;
esac
