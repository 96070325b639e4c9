#!/usr/bin/env bash
# Issue #22 on the GPU machine, once staged (benchmarks/stage_gpu.sh): long completions on the
# Llama-3.1-8B shape, ours beside TRL 1.16. Results: $OUT/long/*.json (OUT defaults to ./out).
#   bash benchmarks/long_context_gpu.sh model   # /tmp/llama8b: the shape with random weights (16 GB on disk)
#   bash benchmarks/long_context_gpu.sh lora    # 8 x 20,000 tokens, LoRA r16: ours, then TRL
#   bash benchmarks/long_context_gpu.sh qlora   # the same with QLoRA (nf4)
#   bash benchmarks/long_context_gpu.sh cap     # held to 80 GB, QLoRA at LENGTH tokens (default 49,152), memory only
#   bash benchmarks/long_context_gpu.sh cap-trl # the same for TRL 1.16
#   bash benchmarks/long_context_gpu.sh cap-bisect      # the longest QLoRA length under the cap, LOW to HIGH (default
#   bash benchmarks/long_context_gpu.sh cap-trl-bisect  # 4,096 to 49,152, HIGH tried first) to RESOLUTION (2,048);
#                                                       # every try a process of its own: $OUT/long/*bisect*.json
#   bash benchmarks/long_context_gpu.sh model32 # /tmp/qwen32b: the Qwen3-32B shape, its matrices zeros left as holes
#                                               # of a sparse file (61 GiB read, a few MB on disk: `model --sparse`)
#   bash benchmarks/long_context_gpu.sh cap32   # held to 80 GB, LoRA 16-bit on the 32B shape at LENGTH tokens (default
#                                               # 6,656), fp8 KV cache, memory only; cap32-trl: TRL 1.16. An H200:
#                                               # an H100 has less than the 80 GB cap
# One trainer at a time, for a machine that runs a command 10 minutes at most (an 8B step at 20,000 tokens
# is mostly its generation, about 4 minutes of decoding in bf16, more in nf4): lora-ours, lora-trl,
# qlora-ours, qlora-trl. STEPS: GRPO steps per run (default 3; STEPS=1 fits one run in a 10-minute call).
# DECODED=N: memory only, vLLM decodes N tokens a completion, repeated to the full length
# (long_context.py --decoded); cap always runs so (DECODED default 64): 8 x 49,152 tokens would take an
# 8B ten minutes to decode. SET="key=value ...": settings for every grpoflow run (TRL's take none), e.g.
#   SET=grpo.expandable_segments=true bash benchmarks/long_context_gpu.sh cap
set -uo pipefail
OUT=${OUT:-out}
export PYTHONPATH=$PWD:/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sets=() && for kv in ${SET:-}; do sets+=(--set "$kv"); done
bench() {
  local mine=("${sets[@]}") && [[ " $* " == *" --trainer trl "* ]] && mine=()
  python benchmarks/long_context.py "$@" "${mine[@]}" --steps "${STEPS:-3}" --out "$OUT/long" \
    ${DECODED:+--decoded "$DECODED"}
}
mkdir -p "$OUT/long"
case "${1:?model|lora|lora-ours|lora-trl|qlora|qlora-ours|qlora-trl|cap|cap-trl|cap-bisect|cap-trl-bisect|model32|cap32|cap32-trl}" in
  model) python benchmarks/long_context.py model --shape llama3-8b --tokenizer /tmp/smollm2 --out /tmp/llama8b ;;
  lora|lora-ours|qlora|qlora-ours)
    bench run --model /tmp/llama8b --finetune "${1%%-*}" --length 20000 --offload --max-tokens-per-forward 40000
    ;;&
  lora|lora-trl|qlora|qlora-trl)
    bench run --model /tmp/llama8b --finetune "${1%%-*}" --length 20000 --trainer trl
    ;;
  cap|cap-trl|cap-bisect|cap-trl-bisect)  # ours with activation offload and forwards of 50,000 tokens at most
    mine=(--offload --max-tokens-per-forward 50000) && [[ $1 == cap-trl* ]] && mine=(--trainer trl)
    ;;&
  cap|cap-trl)
    DECODED=${DECODED:-64} bench run --model /tmp/llama8b --finetune qlora --cap-gib 80 --length "${LENGTH:-49152}" \
      "${mine[@]}" --tag "qlora-cap-${LENGTH:-49152}"
    ;;
  cap-bisect|cap-trl-bisect)
    DECODED=${DECODED:-64} bench bisect --model /tmp/llama8b --finetune qlora --cap-gib 80 --low "${LOW:-4096}" \
      --high "${HIGH:-49152}" --resolution "${RESOLUTION:-2048}" "${mine[@]}" --tag qlora-cap
    ;;
  model32)
    python benchmarks/long_context.py model --shape qwen3-32b --tokenizer /tmp/smollm2 --out /tmp/qwen32b --sparse
    ;;
  cap32|cap32-trl)
    mine=(--kv-cache-dtype fp8 --offload --max-tokens-per-forward 8192) && [ "$1" = cap32-trl ] && mine=(--trainer trl)
    DECODED=${DECODED:-64} bench run --model /tmp/qwen32b --finetune lora --cap-gib 80 --length "${LENGTH:-6656}" \
      "${mine[@]}" --tag "lora32-cap-${LENGTH:-6656}"
    ;;
esac
