"""Bare vLLM on the prompts the trainer samples: the ceiling for generation inside the trainer.

The same prompts as grpo_vs_trl.py's steps (PromptSampler with the same seed), the same engine
settings as grpoflow's VLLMEngine (gpu_memory_utilization, max_model_len, dtype, seed, processed
log-probs) and the same sampling (n = 8, up to 256 new tokens, temperature 1, the sampled token's
log-prob), but plain `vllm.LLM.generate` with no trainer around it and no sleep mode. Also run
with vLLM's default detokenization, which grpoflow's engine switches off.

    python benchmarks/vllm_bare.py --model /tmp/smollm2 --data /tmp/run/data/<hash> --out $OUT/bench

Writes <out>/vllm_bare[-tag].json: completion tokens / s per generation (the first, with
warm-up, left out of the median) and the device's peak memory (vLLM alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/
from benchmarks.grpo_vs_trl import VLLM_MEMORY, WORKLOAD, DevicePeak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with train.parquet")
    parser.add_argument("--steps", type=int, default=6, help="generations (one per trainer step)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as in the trainer: in process
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from grpoflow.train.sampler import PromptSampler

    w = WORKLOAD
    rows = pq.read_table(args.data / "train.parquet", columns=["prompt"]).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sampler = PromptSampler(len(rows), w["seed"])
    batches = []
    for _ in range(args.steps):
        prompts = [rows[i]["prompt"] for i in sampler.take(w["prompts"])]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        batches.append([{"prompt_token_ids": tokenizer(t, add_special_tokens=False).input_ids[-w["max_prompt_length"]:]}
                        for t in texts])

    results = {"card": torch.cuda.get_device_name(), "model": args.model, "workload": w, "steps": args.steps,
               "date": time.strftime("%Y-%m-%d")}
    with DevicePeak() as device:
        started = time.perf_counter()
        llm = LLM(model=args.model, dtype="bfloat16", seed=w["seed"], gpu_memory_utilization=VLLM_MEMORY,
                  max_model_len=w["max_prompt_length"] + w["max_completion_length"],
                  logprobs_mode="processed_logprobs", max_logprobs=0, disable_cascade_attn=True)
        results["start_seconds"] = time.perf_counter() - started
        for detokenize in (False, True):
            params = SamplingParams(n=w["num_generations"], max_tokens=w["max_completion_length"], temperature=1.0,
                                    logprobs=0, detokenize=detokenize, seed=w["seed"])
            rates = []
            for batch in batches:
                torch.cuda.synchronize()
                started = time.perf_counter()
                outputs = llm.generate(batch, params, use_tqdm=False)
                seconds = time.perf_counter() - started
                tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
                rates.append(tokens / seconds)
            key = "detokenize" if detokenize else "token_ids"
            results[key] = {"tokens_per_second": rates, "median_tokens_per_second": statistics.median(rates[1:])}
            print(f"bare vLLM ({key}): median {statistics.median(rates[1:]):.0f} tok/s over generations 2-{len(rates)}")
    results["device_peak_gib"] = device.gib
    print(f"device peak (vLLM alone): {device.gib:.2f} GiB")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "vllm_bare" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
