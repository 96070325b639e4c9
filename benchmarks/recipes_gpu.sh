#!/usr/bin/env bash
# Issue #20's GPU recipes, side by side on one card, in calls of at most 10 minutes that each pick up
# where the last one stopped (send the same command again until it prints "all done"):
#   lane chain: configs/chain-sum-gpu.yaml, train -> eval-trained -> report  (RUN=$WORK/chain)
#   lane gsm8k: configs/gsm8k-gpu.yaml,     train -> eval-trained -> report  (RUN=$WORK/gsm8k-run)
#   lane tool:  configs/gsm8k-python-tool-gpu.yaml (issue #24: the python tool), train -> eval-trained -> report
#   lane base:  the base model evaluated once for each recipe lane that is on (eval-trained reuses the
#               figures)
#   lane trl:   TRL 1.16 on chain_sum, same data and step budget, then evaluated beside ours
# A 135M model leaves an H100 or H200 mostly idle, so the four lanes share it: each vLLM engine gets
# rollout.gpu_memory_utilization=$MEMORY, and each lane waits for the engines started before it (vLLM
# measures free memory while it starts). Each phase's figures are copied to $WORK/out as it ends.
# The device hands back at most 8 files, so the lanes write under $WORK (/tmp/recipes) and the call ends by
# packing $WORK/out into $OUT/recipes.tgz beside the lanes' tails. LANES picks the lanes (default chain,
# gsm8k, base and trl).
#   OUT=$OUT DEADLINE_S=540 bash benchmarks/recipes_gpu.sh
#   LANES="gsm8k trl" OUT=$OUT DEADLINE_S=540 bash benchmarks/recipes_gpu.sh
#   LANES="tool base" OUT=$OUT DEADLINE_S=540 bash benchmarks/recipes_gpu.sh
# STEPS=N trains the grpoflow lanes for N GRPO steps instead of their config's max_steps (TRL's lane keeps
# the config's), for a card lent for less time than the whole recipe takes: the same STEPS in every call.
set -uo pipefail
DEADLINE_S=${DEADLINE_S:-540} MEMORY=${MEMORY:-0.12} BACK=${OUT:-/tmp/recipes-back} WORK=${WORK:-/tmp/recipes}
LANES=${LANES:-chain gsm8k base trl} MODEL=${MODEL:-/tmp/smollm2}
OUT=$WORK/out CHAIN=$WORK/chain GSM=$WORK/gsm8k-run TRL=$WORK/trl-chain TOOL=$WORK/tool-run
started=$SECONDS
mkdir -p "$OUT" "$CHAIN" "$GSM" "$TRL" "$TOOL"
export SETS="--set rollout.gpu_memory_utilization=$MEMORY${STEPS:+ --set grpo.max_steps=$STEPS}"
left() { echo $((DEADLINE_S - (SECONDS - started))); }
save() { mkdir -p "$OUT/$2"; cp -r "$1"/*.json "$1"/*.log "$OUT/$2/" 2>/dev/null
         find "$1" -name metrics.jsonl -o -name 'eval*.jsonl' -o -name '*.png' -o -name 'summary*' \
           | while read -r f; do cp "$f" "$OUT/$2/$(echo "${f#"$1"/}" | tr / _)"; done; true; }
engines() { cat "$CHAIN"/*.log "$GSM"/*.log "$TOOL"/*.log 2>/dev/null | grep -c "rollout engine: vLLM" ; }
# waits until $1 engines have started (or 180 s, or the deadline)
await_engines() { local t=$SECONDS; while [ "$(engines)" -lt "$1" ] && [ $((SECONDS - t)) -lt 180 ] && [ "$(left)" -gt 60 ]; do sleep 3; done; }
finished() { grep -q '"finished": true' "$1/train.json" 2>/dev/null; }

lane_recipe() {  # RUN CONFIG NAME
  local run=$1 config=$2 name=$3
  if ! finished "$run"; then
    RUN=$run CONFIG=$config BUDGET_S=$(( $(left) - 100 )) timeout $(( $(left) - 10 )) bash benchmarks/gsm8k_gpu.sh train
    save "$run" "$name"
  fi
  finished "$run" || { echo "$name: training goes on next call ($(left) s left)"; return; }
  [ -s "$run/eval-trained.json" ] || { RUN=$run CONFIG=$config timeout $(( $(left) - 5 )) bash benchmarks/gsm8k_gpu.sh eval-trained; save "$run" "$name"; }
  [ -s "$run/eval-trained.json" ] && RUN=$run CONFIG=$config NAME=$name OUT=$OUT/$name bash benchmarks/gsm8k_gpu.sh report
  echo "$name: done"
}
lane_base() {
  local pairs=()
  on chain && pairs+=("$CHAIN configs/chain-sum-gpu.yaml chain-sum")
  on gsm8k && pairs+=("$GSM configs/gsm8k-gpu.yaml gsm8k")
  on tool && pairs+=("$TOOL configs/gsm8k-python-tool-gpu.yaml gsm8k-python-tool")
  for pair in "${pairs[@]}"; do
    set -- $pair
    [ -s "$1/eval-base.json" ] || { RUN=$1 CONFIG=$2 timeout $(( $(left) - 5 )) bash benchmarks/gsm8k_gpu.sh eval-base; save "$1" "$3"; }
  done
  echo "base: done"
}
lane_trl() {
  local t=$SECONDS
  [[ " $LANES " == *" chain "* ]] || python -m grpoflow.cli prepare -c configs/chain-sum-gpu.yaml \
      --set "data.output_dir=$CHAIN/data" > "$TRL/prepare.json" 2>> "$TRL/trl.log"
  until ls "$CHAIN"/data/*/train.parquet >/dev/null 2>&1 || [ $((SECONDS - t)) -gt 300 ]; do sleep 5; done
  # TRL's vLLM fails its start-up memory check when another lane frees memory meanwhile (standby, every
  # step): a second try, the way grpoflow's engine tries again (H200, 2026-12-05: the first try lost)
  for try in 1 2; do
    [ -d "$TRL/final" ] && break
    [ "$(left)" -gt 420 ] || { echo "trl: too little time left this call ($(left) s)"; return; }
    timeout $(( $(left) - 10 )) python benchmarks/trl_recipe.py -c configs/chain-sum-gpu.yaml \
      --data "$(ls -d "$CHAIN"/data/*/ | head -1)" --model "$MODEL" --out "$TRL" --engine vllm \
      --vllm-memory "$MEMORY" > "$TRL/trl.json" 2> "$TRL/trl.log"
    cp "$TRL"/trl.json "$TRL"/trl.log "$TRL"/trl_metrics.jsonl "$OUT/" 2>/dev/null
    grep -q "Error in memory profiling" "$TRL/trl.log" || break
    echo "trl: vLLM's start lost the memory check to another lane (try $try)"
    sleep "${TRL_RETRY_WAIT_S:-$((5 + RANDOM % 10))}"
  done
  [ -d "$TRL/final" ] || { echo "trl: not finished"; return; }
  [ -s "$TRL/eval.json" ] || timeout $(( $(left) - 5 )) python -m grpoflow.cli evaluate -c configs/chain-sum-gpu.yaml \
      --set "grpo.warmup.source=/tmp/gsm8k" --set "model.name_or_path=$MODEL" \
      --set "data.output_dir=$CHAIN/data" --set "eval.output_dir=$CHAIN/eval" $SETS \
      --model "base=$MODEL" --model "trl=$TRL/final" > "$TRL/eval.json" 2>> "$TRL/trl.log"
  cp "$TRL"/eval.json "$TRL"/trl.log "$OUT/" 2>/dev/null
  echo "trl: done"
}

on() { [[ " $LANES " == *" $1 "* ]]; }
n=$(engines)
on chain && { lane_recipe "$CHAIN" configs/chain-sum-gpu.yaml chain-sum > "$OUT/lane-chain.txt" 2>&1 & n=$((n + 1)); await_engines $n; }
on gsm8k && { lane_recipe "$GSM" configs/gsm8k-gpu.yaml gsm8k > "$OUT/lane-gsm8k.txt" 2>&1 & n=$((n + 1)); await_engines $n; }
on tool && { lane_recipe "$TOOL" configs/gsm8k-python-tool-gpu.yaml gsm8k-python-tool > "$OUT/lane-tool.txt" 2>&1 &
             n=$((n + 1)); await_engines $n; }
on base && { lane_base > "$OUT/lane-base.txt" 2>&1 & n=$((n + 1)); await_engines $n; }
on trl && { lane_trl > "$OUT/lane-trl.txt" 2>&1 & }
wait
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card.txt"
mkdir -p "$BACK" && tar czf "$BACK/recipes.tgz" -C "$OUT" . && cp "$OUT"/lane-*.txt "$BACK/"
tail -n 3 "$OUT"/lane-*.txt
all=1; for lane in $LANES; do grep -q "done" "$OUT/lane-$lane.txt" || all=0; done
[ $all = 1 ] && echo "all done: $LANES"
