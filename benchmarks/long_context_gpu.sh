#!/usr/bin/env bash
# Issue #22 on the GPU machine, once staged (benchmarks/stage_gpu.sh): long completions on the
# Llama-3.1-8B shape, ours beside TRL 1.16. Results: $OUT/long/*.json (OUT defaults to ./out).
#   bash benchmarks/long_context_gpu.sh model   # /tmp/llama8b: the shape with random weights (16 GB on disk)
#   bash benchmarks/long_context_gpu.sh lora    # 8 x 20,000 tokens, LoRA r16: ours, then TRL
#   bash benchmarks/long_context_gpu.sh qlora   # the same with QLoRA (nf4)
#   bash benchmarks/long_context_gpu.sh cap     # held to 80 GB: the longest QLoRA completion, 47,500 to 98,304
# One trainer at a time, for a machine that runs a command 10 minutes at most (an 8B step at 20,000 tokens
# is mostly its generation, about 5 minutes of decoding): lora-ours, lora-trl, qlora-ours, qlora-trl.
# STEPS: GRPO steps per run (default 3; STEPS=1 fits one run in a 10-minute call).
set -uo pipefail
OUT=${OUT:-out}
export PYTHONPATH=$PWD:/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bench() { python benchmarks/long_context.py "$@" --steps "${STEPS:-3}" --out "$OUT/long"; }
mkdir -p "$OUT/long"
case "${1:?model|lora|lora-ours|lora-trl|qlora|qlora-ours|qlora-trl|cap}" in
  model) python benchmarks/long_context.py model --shape llama3-8b --tokenizer /tmp/smollm2 --out /tmp/llama8b ;;
  lora|lora-ours|qlora|qlora-ours)
    bench run --model /tmp/llama8b --finetune "${1%%-*}" --length 20000 --offload --max-tokens-per-forward 40000
    ;;&
  lora|lora-trl|qlora|qlora-trl)
    bench run --model /tmp/llama8b --finetune "${1%%-*}" --length 20000 --trainer trl
    ;;
  cap)
    bench bisect --model /tmp/llama8b --finetune qlora --cap-gib 80 --low 47500 --high 98304 \
      --offload --max-tokens-per-forward 50000
    ;;
esac
