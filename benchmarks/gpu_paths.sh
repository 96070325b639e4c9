#!/usr/bin/env bash
# The GPU-only training paths, a few GRPO steps each on SmolLM2-135M-Instruct / GSM8K: QLoRA
# (bitsandbytes 4-bit base) with 8-bit AdamW, LoRA in float16 (loss scaling), full fine-tuning
# in float16. Prints, per path, the steps run, the steps skipped as non-finite, the loss and the
# peak memory; fails if a path fails. Needs bitsandbytes (staged by benchmarks/stage_gpu.sh).
#   GSM8K=/tmp/gsm8k MODEL=/tmp/smollm2 RUN=/tmp/paths benchmarks/gpu_paths.sh
set -euo pipefail
GSM8K=${GSM8K:-/tmp/gsm8k} MODEL=${MODEL:-/tmp/smollm2} RUN=${RUN:-/tmp/paths}
common=(-c configs/gsm8k-gpu.yaml --set "data.source=$GSM8K" --set "model.name_or_path=$MODEL"
        --set "data.output_dir=$RUN/data" --set grpo.max_steps=4 --set grpo.warmup.rows=64
        --set grpo.warmup.eval_prompts=8 --set grpo.save_steps=4)
run() {
  local name=$1; shift
  python -m grpoflow.cli train "${common[@]}" --set "grpo.output_dir=$RUN/$name" "$@" > "$RUN/$name.json" \
    2> "$RUN/$name.log" || { echo "$name: FAILED"; tail -20 "$RUN/$name.log"; return 1; }
  python - "$RUN/$name" "$name" <<'PY'
import json, pathlib, sys
folder, name = pathlib.Path(sys.argv[1]), sys.argv[2]
steps = [json.loads(l) for l in next(folder.glob("*/metrics.jsonl")).read_text().splitlines()]
report = json.loads(next(folder.glob("*/final/report.json")).read_text())
print(f"{name}: {len(steps)} steps, {steps[-1]['skipped_steps']} skipped, loss {[round(s['loss'], 4) for s in steps]}, "
      f"grad_norm {[round(s['grad_norm'], 3) for s in steps]}, peak {max(s['memory/peak_gib'] for s in steps):.2f} GiB, "
      f"warm-up strict format {report['warmup']['format_strict_before']:.2f} -> {report['warmup']['format_strict_after']:.2f}")
PY
}
mkdir -p "$RUN"
run qlora-adamw8bit --set model.finetune=qlora --set grpo.optim=adamw_8bit --set grpo.learning_rate=2e-5 \
    --set grpo.warmup.learning_rate=2e-4
run lora-fp16 --set model.finetune=lora --set model.dtype=float16 --set grpo.learning_rate=2e-5 \
    --set grpo.warmup.learning_rate=2e-4
run full-fp16 --set model.finetune=full --set model.dtype=float16
