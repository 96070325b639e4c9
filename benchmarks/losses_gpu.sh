#!/usr/bin/env bash
# Issue #27's GPU run: the GSM8K recipe (configs/gsm8k-gpu.yaml) with loss_type dapo, cispo and sapo
# side by side on one card, the same data, seed and warm-up, STEPS GRPO steps each, held-out accuracy
# on EVAL_PROMPTS test problems every EVAL_STEPS. A 135M model leaves the card mostly idle, so the three
# share it (each vLLM engine takes rollout.gpu_memory_utilization=$MEMORY; each lane starts once the one
# before it has its engine, since vLLM measures free memory while it starts). The device hands back at
# most 8 files of 16 MiB: the figures (json, jsonl, logs, plots; no weights) are packed into
# $OUT/losses.tgz. Staged as benchmarks/stage_gpu.sh says; GSM8K and MODEL as benchmarks/gsm8k_gpu.sh takes them.
#   OUT=$OUT DEADLINE_S=300 bash benchmarks/losses_gpu.sh
set -uo pipefail
DEADLINE_S=${DEADLINE_S:-540} STEPS=${STEPS:-80} EVAL_STEPS=${EVAL_STEPS:-20} EVAL_PROMPTS=${EVAL_PROMPTS:-128}
MEMORY=${MEMORY:-0.15} BACK=${OUT:-/tmp/losses-back}
WORK=${WORK:-/tmp/losses}
started=$SECONDS
mkdir -p "$WORK" "$BACK"
left() { echo $((DEADLINE_S - (SECONDS - started))); }
lane() {  # LOSS, then more --set words: the recipe script's train phase, one folder per loss
  local loss=$1; shift
  RUN=$WORK/$loss CONFIG=configs/gsm8k-gpu.yaml BUDGET_S=$(( $(left) - 45 )) SETS="--set grpo.loss_type=$loss \
    --set grpo.max_steps=$STEPS --set grpo.eval_steps=$EVAL_STEPS --set grpo.save_steps=$STEPS \
    --set grpo.eval_prompts=$EVAL_PROMPTS --set rollout.gpu_memory_utilization=$MEMORY $*" \
    bash benchmarks/gsm8k_gpu.sh train > /dev/null
}
await_engine() { local t=$SECONDS
  until grep -q "rollout engine: vLLM" "$WORK/$1/train.log" 2>/dev/null || [ $((SECONDS - t)) -gt 150 ]; do sleep 2; done; }
lane dapo & await_engine dapo
lane cispo --set grpo.epsilon_high=5.0 & await_engine cispo
lane sapo &
wait
for loss in dapo cispo sapo; do
  find "$WORK/$loss/train" -name metrics.jsonl -exec cp {} "$WORK/$loss/metrics.jsonl" \; 2>/dev/null
  echo "$loss: $(grep -o '"finished": [a-z]*' "$WORK/$loss/train.json") $(grep -o '"steps": [0-9]*' "$WORK/$loss/train.json" | head -1)"
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$WORK/card.txt"
# the figures only: no data, weights, checkpoints or tokenizer files
(cd "$WORK" && find . \( -name data -o -name checkpoints -o -name final -o -name warmup \) -prune -o -type f \
   \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.png' -o -name '*.txt' \) \
   ! -name 'tokenizer*' ! -name 'vocab*' -size -4M -print | tar czf "$BACK/losses.tgz" -T -)
du -h "$BACK/losses.tgz"
