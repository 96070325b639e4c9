#!/usr/bin/env bash
# Variants of the GSM8K recipe (configs/gsm8k-gpu.yaml) side by side on one GPU: the same data, seed and
# warm-up, STEPS GRPO steps each, held-out accuracy on EVAL_PROMPTS test problems every EVAL_STEPS, then
# one plot and the tables of benchmarks/compare_runs.py. VARIANTS picks the set:
#   losses  dapo | cispo (epsilon_high 5.0, ScaleRL's cap) | sapo                       (issue #27)
#   async   sync | async (rollout.mode: async) | dynamic (async + grpo.dynamic_sampling) (issue #21)
# A 135M model leaves the card mostly idle, so the lanes share it by default (each vLLM engine takes
# rollout.gpu_memory_utilization=$MEMORY; each lane starts once the one before has its engine, since vLLM
# measures free memory while it starts). Sharing the card slows each lane by what the others do: for
# wall-clock comparisons (async against sync) TOGETHER=0 runs the lanes one after another. A lane stopped
# by the deadline checkpoints, and the same command resumes it. The device hands back at most 8 files of
# 16 MiB: the figures (json, jsonl, logs, plots; no weights) are packed into $OUT/$VARIANTS.tgz.
# Staged as benchmarks/stage_gpu.sh says; GSM8K and MODEL as benchmarks/gsm8k_gpu.sh takes them.
#   VARIANTS=losses OUT=$OUT DEADLINE_S=540 bash benchmarks/variants_gpu.sh
#   VARIANTS=async TOGETHER=0 STEPS=100 OUT=$OUT DEADLINE_S=540 bash benchmarks/variants_gpu.sh
# SET="key=value ...": settings for every lane, e.g. the async benchmark's:
#   SET="grpo.torch_compile=true grpo.expandable_segments=true" VARIANTS=async TOGETHER=0 STEPS=100 ...
set -uo pipefail
VARIANTS=${VARIANTS:-losses} DEADLINE_S=${DEADLINE_S:-540} STEPS=${STEPS:-80} EVAL_STEPS=${EVAL_STEPS:-20}
EVAL_PROMPTS=${EVAL_PROMPTS:-128} MEMORY=${MEMORY:-0.15} TOGETHER=${TOGETHER:-1} BACK=${OUT:-/tmp/$VARIANTS-back}
WORK=${WORK:-/tmp/$VARIANTS}
case "$VARIANTS" in  # lane names, and each lane's --set words
  losses) names=(dapo cispo sapo)
          sets=("--set grpo.loss_type=dapo" "--set grpo.loss_type=cispo --set grpo.epsilon_high=5.0"
                "--set grpo.loss_type=sapo") ;;
  async)  names=(sync async dynamic)
          sets=("--set rollout.mode=sync" "--set rollout.mode=async"
                "--set rollout.mode=async --set grpo.dynamic_sampling=true") ;;
  *) echo "VARIANTS: losses or async, not '$VARIANTS'" >&2; exit 2 ;;
esac
started=$SECONDS
mkdir -p "$WORK" "$BACK"
left() { echo $((DEADLINE_S - (SECONDS - started))); }
every=() && for kv in ${SET:-}; do every+=(--set "$kv"); done
lane() {  # NAME SETS: the recipe script's train phase, one folder per lane
  RUN=$WORK/$1 CONFIG=configs/gsm8k-gpu.yaml BUDGET_S=$(( $(left) - 45 )) SETS="$2 ${every[*]} \
    --set grpo.max_steps=$STEPS --set grpo.eval_steps=$EVAL_STEPS --set grpo.save_steps=$STEPS \
    --set grpo.eval_prompts=$EVAL_PROMPTS --set rollout.gpu_memory_utilization=$MEMORY" \
    bash benchmarks/gsm8k_gpu.sh train > /dev/null
}
await_engine() { local t=$SECONDS
  until grep -q "rollout engine: vLLM" "$WORK/$1/train.log" 2>/dev/null || [ $((SECONDS - t)) -gt 150 ]; do sleep 2; done; }
for i in "${!names[@]}"; do
  [ "$(left)" -gt 90 ] || { echo "${names[$i]}: not started ($(left) s left); the same command goes on"; continue; }
  if [ "$TOGETHER" = 1 ]; then
    lane "${names[$i]}" "${sets[$i]}" &
    [ $((i + 1)) -lt ${#names[@]} ] && await_engine "${names[$i]}"
  else
    lane "${names[$i]}" "${sets[$i]}"
  fi
done
wait
runs=()
for name in "${names[@]}"; do
  find "$WORK/$name/train" -name metrics.jsonl -exec cp {} "$WORK/$name/metrics.jsonl" \; 2>/dev/null
  echo "$name: $(grep -o '"finished": [a-z]*' "$WORK/$name/train.json" 2>/dev/null) $(grep -o '"steps": [0-9]*' "$WORK/$name/train.json" 2>/dev/null | head -1)"
  [ -s "$WORK/$name/metrics.jsonl" ] && runs+=("$name=$WORK/$name/metrics.jsonl")
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$WORK/card.txt"
[ ${#runs[@]} -gt 0 ] && python benchmarks/compare_runs.py --out "$WORK" --name "$VARIANTS" \
  --title "GSM8K recipe, $STEPS steps: ${names[*]} ($(cut -d, -f1 "$WORK/card.txt"), $(date +%F))" "${runs[@]}" \
  > "$WORK/$VARIANTS.md"
# async against sync: the same curves against training seconds, what "at equal wall-clock time" means
[ "$VARIANTS" = async ] && [ ${#runs[@]} -gt 0 ] && python benchmarks/compare_runs.py --x seconds --out "$WORK" \
  --name "$VARIANTS-seconds" --title "GSM8K recipe against training seconds: ${names[*]}" "${runs[@]}" > /dev/null
# the figures only: no data, weights, checkpoints or tokenizer files
(cd "$WORK" && find . \( -name data -o -name checkpoints -o -name final -o -name warmup \) -prune -o -type f \
   \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.png' -o -name '*.txt' -o -name '*.md' \) \
   ! -name 'tokenizer*' ! -name 'vocab*' -size -4M -print | tar czf "$BACK/$VARIANTS.tgz" -T -)
du -h "$BACK/$VARIANTS.tgz"
