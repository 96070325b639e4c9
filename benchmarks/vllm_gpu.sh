#!/usr/bin/env bash
# Issue #6's measurements on the GPU machine: the vLLM engine in the trainer vs TRL + vLLM, vs
# bare vLLM and vs our transformers engine; memory with and without standby and weight sharing;
# the same for a random-init Qwen3-0.6B shape. Every trainer runs in a process of its own.
#
# Stage the machine first (benchmarks/stage_gpu.sh: vLLM, TRL and the rest at the GPU lock's versions in
# /tmp/site, GSM8K in /tmp/gsm8k, SmolLM2 in /tmp/smollm2), then this script's `setup`:
#   bash benchmarks/vllm_gpu.sh setup      # /tmp/run/data (GSM8K prepared), /tmp/qwen3r (a random Qwen3 shape)
#   bash benchmarks/vllm_gpu.sh speed      # bare vLLM, grpoflow (vLLM), TRL + vLLM
#   bash benchmarks/vllm_gpu.sh memory     # grpoflow (transformers), no standby, LoRA shared / not, TRL LoRA
#   bash benchmarks/vllm_gpu.sh qwen3      # the same on the Qwen3-0.6B shape
#   bash benchmarks/vllm_gpu.sh repeat     # grpoflow and TRL (SmolLM2, full) twice each, interleaved
#   bash benchmarks/vllm_gpu.sh interleaved  # grpoflow, TRL, grpoflow (SmolLM2, full): a ratio with its spread
#   bash benchmarks/vllm_gpu.sh tests      # the GPU tests (tests/test_vllm_gpu.py), one process each (K=async: those
#                                          # whose names match, as pytest -k)
#   bash benchmarks/vllm_gpu.sh async      # issue #21: ours sync, TRL, ours async, ours async + dynamic sampling,
#                                          # on SmolLM2 and on the Qwen3-0.6B shape (MODELS=/tmp/smollm2: one of them;
#                                          # ENGINE=hf: transformers generate for both trainers, as staged by
#                                          # LITE=1 benchmarks/stage_gpu.sh, which carries no vLLM)
#   bash benchmarks/vllm_gpu.sh headline   # issues #21 and #22 in one call, interleaved: ours with the defaults (SET not
#                                          # applied), ours async, TRL, ours async again, ours with the defaults
#                                          # again (MODELS= default /tmp/smollm2)
#   bash benchmarks/vllm_gpu.sh async-server  # issue #21: ours async with the rollout server on the trainer's card
#                                          # (vLLM in a process of its own, weights read over CUDA IPC), TRL, ours
#                                          # async-server again, ours async in a thread (MODELS= one of them)
#   bash benchmarks/vllm_gpu.sh async-overlap  # issue #21: what keeps the async thread's two phases from overlapping:
#                                          # ours async as is, TRL, then with rollout.async_priority=high, with a
#                                          # 0.5 ms interpreter switch interval, both, and with the training pass's
#                                          # matrix products held to all SMs but 32 (MODELS= default qwen3r)
#   bash benchmarks/vllm_gpu.sh compile    # issue #21: sync with and without grpo.torch_compile, TRL, async compiled
#                                          # (MODELS= default qwen3r)
#   bash benchmarks/vllm_gpu.sh contention # issue #21: a generation in a thread beside a pure-Python loop, a CUDA
#                                          # graph of products, small eager kernels and a training pass: what the two
#                                          # phases contend for (bench/contention-*.json; MODELS= default qwen3r)
#   bash benchmarks/vllm_gpu.sh profile    # issue #21: sync and async under torch's profiler, 4 steps each: where a
#                                          # step's device time goes (bench/profile-*.txt, *.copies.txt; MODELS=
#                                          # default qwen3r)
#   bash benchmarks/vllm_gpu.sh server     # issue #25 (2 GPUs): 512 completions a step, one GPU colocated vs the
#                                          # trainer on GPU 0 + our rollout server on GPU 1, then TRL's server mode on
#                                          # the same split; SmolLM2 and the Qwen3-0.6B shape (MODELS= one of them)
# Results: $OUT/bench/*.json (OUT defaults to ./out).
# SET="key=value ...": settings for every grpoflow run of the mode (TRL's runs take none), e.g.
#   SET=grpo.torch_compile=true bash benchmarks/vllm_gpu.sh async-overlap
set -uo pipefail
OUT=${OUT:-out}
export PYTHONPATH=$PWD:/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sets=() && for kv in ${SET:-}; do sets+=(--set "$kv"); done
bench() {
  local mine=("${sets[@]}") && [[ " $* " == *" --only trl "* || -n "${DEFAULTS:-}" ]] && mine=()
  python benchmarks/grpo_vs_trl.py --data "$(ls -d /tmp/run/data/*/ | head -1)" --steps "${STEPS:-6}" \
    --out "$OUT/bench" "${mine[@]}" "$@"
}
bare() { python benchmarks/vllm_bare.py --data "$(ls -d /tmp/run/data/*/ | head -1)" --out "$OUT/bench" "$@"; }
mkdir -p "$OUT/bench"

case "${1:?setup|speed|memory|qwen3|repeat|interleaved|async|headline|async-server|async-overlap|compile|contention|profile|server|tests}" in
  setup)
    set -e
    [ -d /tmp/smollm2 ] || { echo "/tmp/smollm2 is missing: stage the machine first (benchmarks/stage_gpu.sh)" >&2; exit 1; }
    python -m grpoflow.cli prepare -c configs/gsm8k-gpu.yaml --set data.source=/tmp/gsm8k --set data.output_dir=/tmp/run/data
    python benchmarks/random_model.py --tokenizer /tmp/smollm2 --out /tmp/qwen3r
    ;;
  speed)
    bare --model /tmp/smollm2 --tag smollm2
    bench --model /tmp/smollm2 --engine vllm --only ours --tag smollm2-full
    bench --model /tmp/smollm2 --engine vllm --only trl --tag smollm2-full
    ;;
  memory)
    bench --model /tmp/smollm2 --engine hf --only ours --tag smollm2-full-hf
    bench --model /tmp/smollm2 --engine vllm --only ours --set rollout.sleep=false --tag smollm2-full-nosleep
    bench --model /tmp/smollm2 --engine vllm --only ours --finetune lora --tag smollm2-lora-shared
    bench --model /tmp/smollm2 --engine vllm --only ours --finetune lora --set rollout.share_weights=false --tag smollm2-lora-noshare
    bench --model /tmp/smollm2 --engine vllm --only trl --finetune lora --tag smollm2-lora
    ;;
  qwen3)
    bare --model /tmp/qwen3r --tag qwen3
    bench --model /tmp/qwen3r --engine vllm --only ours --set grpo.max_nonfinite_steps=100 --tag qwen3-full
    bench --model /tmp/qwen3r --engine vllm --only trl --tag qwen3-full
    bench --model /tmp/qwen3r --engine vllm --only ours --finetune lora --set grpo.max_nonfinite_steps=100 --tag qwen3-lora-shared
    bench --model /tmp/qwen3r --engine vllm --only ours --finetune lora --set grpo.max_nonfinite_steps=100 --set rollout.share_weights=false --tag qwen3-lora-noshare
    bench --model /tmp/qwen3r --engine vllm --only trl --finetune lora --tag qwen3-lora
    ;;
  interleaved)
    bench --model /tmp/smollm2 --engine vllm --only ours --tag smollm2-full-1
    bench --model /tmp/smollm2 --engine vllm --only trl --tag smollm2-full
    bench --model /tmp/smollm2 --engine vllm --only ours --tag smollm2-full-2
    ;;
  async)
    engine=${ENGINE:-vllm} && suffix=$([ "$engine" = vllm ] || echo "-$engine")
    for model in ${MODELS:-/tmp/smollm2 /tmp/qwen3r}; do
      name=$(basename "$model")$suffix && extra=()
      [ "$(basename "$model")" = qwen3r ] && extra=(--set grpo.max_nonfinite_steps=100)
      # the headline ratio interleaved: async, TRL, async again (one call is one sample)
      bench --model "$model" --engine "$engine" --only ours "${extra[@]}" --tag "$name-sync"
      bench --model "$model" --engine "$engine" --only ours "${extra[@]}" --set rollout.mode=async --tag "$name-async"
      bench --model "$model" --engine "$engine" --only trl --tag "$name"
      bench --model "$model" --engine "$engine" --only ours "${extra[@]}" --set rollout.mode=async --tag "$name-async-2"
      # dynamic sampling after the format warm-up. Not on the random Qwen3 shape: every group ties at zero
      # reward there, the worst case (each step draws dynamic_sampling_max_draws generations and keeps
      # nothing: 10.3 s a step on an H100, 2026-12-06)
      [ "$(basename "$model")" = qwen3r ] && continue
      warm=(--set grpo.warmup.enabled=true --set grpo.warmup.rows=1024 --set grpo.warmup.batch_size=16
        --set grpo.warmup.learning_rate=2e-5)
      bench --model "$model" --engine "$engine" --only ours "${warm[@]}" --set rollout.mode=async \
        --set grpo.dynamic_sampling=true --tag "$name-async-dynamic"
    done
    ;;
  headline)
    for model in ${MODELS:-/tmp/smollm2}; do
      name=$(basename "$model") && extra=()
      [ "$name" = qwen3r ] && extra=(--set grpo.max_nonfinite_steps=100)
      DEFAULTS=1 bench --model "$model" --engine vllm --only ours "${extra[@]}" --tag "$name-defaults-1"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set rollout.mode=async --tag "$name-async-1"
      bench --model "$model" --engine vllm --only trl --tag "$name"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set rollout.mode=async --tag "$name-async-2"
      DEFAULTS=1 bench --model "$model" --engine vllm --only ours "${extra[@]}" --tag "$name-defaults-2"
    done
    ;;
  async-server)
    for model in ${MODELS:-/tmp/smollm2 /tmp/qwen3r}; do
      name=$(basename "$model") && extra=()
      [ "$name" = qwen3r ] && extra=(--set grpo.max_nonfinite_steps=100)
      server=(--set rollout.mode=async --set rollout.placement=server)
      bench --model "$model" --engine vllm --only ours "${extra[@]}" "${server[@]}" --tag "$name-async-server-1"
      bench --model "$model" --engine vllm --only trl --tag "$name-1"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" "${server[@]}" --tag "$name-async-server-2"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set rollout.mode=async --tag "$name-async-thread"
    done
    ;;
  async-overlap)
    for model in ${MODELS:-/tmp/qwen3r}; do
      name=$(basename "$model") && extra=(--set rollout.mode=async)
      [ "$name" = qwen3r ] && extra+=(--set grpo.max_nonfinite_steps=100)
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --tag "$name-async"
      bench --model "$model" --engine vllm --only trl --tag "$name"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set rollout.async_priority=high \
        --tag "$name-async-high"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --switch-interval 0.0005 --tag "$name-async-switch"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set rollout.async_priority=high \
        --switch-interval 0.0005 --tag "$name-async-high-switch"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --sm-carveout 32 --tag "$name-async-carveout"
    done
    ;;
  compile)
    # grpo.torch_compile (each decoder layer compiled) beside the eager layers and TRL, sync and async (issue #21)
    for model in ${MODELS:-/tmp/qwen3r}; do
      name=$(basename "$model") && extra=()
      [ "$name" = qwen3r ] && extra=(--set grpo.max_nonfinite_steps=100)
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --tag "$name-sync"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set grpo.torch_compile=true \
        --tag "$name-sync-compiled"
      bench --model "$model" --engine vllm --only trl --tag "$name"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set grpo.torch_compile=true \
        --set rollout.mode=async --tag "$name-async-compiled"
    done
    ;;
  contention)
    # what a generation in its own thread contends for: the interpreter, launches, or the SMs (issue #21)
    for model in ${MODELS:-/tmp/qwen3r}; do
      python benchmarks/contention.py --model "$model" --out "$OUT/bench" --tag "$(basename "$model")"
    done
    ;;
  profile)
    for model in ${MODELS:-/tmp/qwen3r}; do
      name=$(basename "$model") && extra=()
      [ "$name" = qwen3r ] && extra=(--set grpo.max_nonfinite_steps=100)
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --steps 4 --profile --tag "$name-profile-sync"
      bench --model "$model" --engine vllm --only ours "${extra[@]}" --set rollout.mode=async --steps 4 --profile \
        --tag "$name-profile-async"
    done
    ;;
  server)
    for model in ${MODELS:-/tmp/smollm2 /tmp/qwen3r}; do
      name=$(basename "$model") && extra=()
      [ "$name" = qwen3r ] && extra=(--set grpo.max_nonfinite_steps=100)
      bench --model "$model" --engine vllm --only ours --prompts 64 "${extra[@]}" --tag "$name-512-colocate"
      bench --model "$model" --engine vllm --only ours --prompts 64 "${extra[@]}" --set rollout.placement=server \
        --set "rollout.server_gpus=[1]" --set rollout.gpu_memory_utilization=0.85 --tag "$name-512-server"
      bench --model "$model" --engine vllm --only ours --prompts 64 "${extra[@]}" --set rollout.placement=server \
        --set "rollout.server_gpus=[1]" --set rollout.gpu_memory_utilization=0.85 --set rollout.mode=async \
        --tag "$name-512-server-async"
      bench --model "$model" --engine vllm --only trl --prompts 64 --tag "$name-512-colocate"
      bench --model "$model" --engine vllm --only trl --prompts 64 --trl-server 1 --tag "$name-512-server"
    done
    ;;
  tests)
    failed=0
    for t in $(python -m pytest -q --collect-only -m gpu tests/test_vllm_gpu.py -k "${K:-}" -p no:cacheprovider | grep '::'); do
      python -m pytest -m gpu -q -s -p no:cacheprovider "$t" >> "$OUT/test-gpu.log" 2>&1 || failed=1
      grep -E "^[0-9]+ (passed|failed)" "$OUT/test-gpu.log" | tail -1
    done
    exit $failed
    ;;
  repeat)
    for round in 1 2; do
      bench --model /tmp/smollm2 --engine vllm --only ours --tag "smollm2-full-r$round"
      bench --model /tmp/smollm2 --engine vllm --only trl --tag "smollm2-full-r$round"
    done
    ;;
esac
