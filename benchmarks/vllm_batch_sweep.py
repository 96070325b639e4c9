"""How vLLM's generation time grows with the batch, through grpoflow's own engine: the part of a
decoding step that does not shrink when data parallelism halves the batch.

Each generate call runs the trainer's sampling (n = 8, temperature 1, up to 256 new tokens, the
sampled token's log-prob) on GSM8K prompts with the default system prompt, through VLLMEngine with
the trainer's settings (sleep mode off: the trainer's wake-up is timed in its own metrics). For each
batch of completions, the median of --repeats calls; then a straight line through
seconds / decoding steps = fixed + per_sequence x batch, where the decoding steps are the longest
completion's tokens. `fixed` does not split across GPUs; `per_sequence x batch` does.

Variants: flat log-probs (the engine's way), nested log-probs (vLLM's default layout: a dict and a
Logprob object a token), and no log-probs (rollout: vllm_importance_sampling_correction false).

    export PYTHONPATH=$PWD:/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1
    python benchmarks/vllm_batch_sweep.py --model /tmp/smollm2 --data /tmp/gsm8k --out $OUT

Writes <out>/vllm_batch_sweep.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="GSM8K folder with train.jsonl")
    parser.add_argument("--batches", default="128,256,512,1024", help="completions a call (n = 8 a prompt)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch
    import vllm
    from transformers import AutoTokenizer

    from grpoflow.config import DEFAULT_SYSTEM_PROMPT
    from grpoflow.rollout.base import SamplingParams
    from grpoflow.rollout.vllm import VLLMEngine

    batches = [int(b) for b in args.batches.split(",")]
    questions = [json.loads(line)["question"] for line in (args.data / "train.jsonl").read_text().splitlines()[:2000]]
    prompts = [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}]
               for q in questions]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    engine = VLLMEngine(args.model, tokenizer, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=768,
                        seed=0, sleep=False, completions_per_call=max(batches))
    result = {"card": torch.cuda.get_device_name(), "vllm": vllm.__version__, "model": args.model,
              "date": time.strftime("%Y-%m-%d"), "max_tokens": args.tokens, "repeats": args.repeats,
              "start_seconds": time.perf_counter() - started, "variants": {}}
    plain = vllm.SamplingParams
    variants = {"flat log-probs": (True, True), "nested log-probs": (True, False), "no log-probs": (False, True)}
    offset = 0
    for name, (logprobs, flat) in variants.items():
        # the engine asks for flat_logprobs=True; the nested variant swaps vLLM's class for the call
        vllm.SamplingParams = plain if flat else _nested(plain)
        rows = []
        for batch in batches:
            n_prompts = batch // 8
            calls = []
            for _ in range(args.repeats + 1):  # the first call of a size warms it up, left out
                chosen = prompts[offset:offset + n_prompts]
                offset = (offset + n_prompts) % (len(prompts) - n_prompts)
                params = SamplingParams(max_tokens=args.tokens, temperature=1.0, n=8, logprobs=logprobs)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                groups = engine.generate(chosen, params)
                seconds = time.perf_counter() - t0
                lengths = [len(c.token_ids) for g in groups for c in g]
                calls.append({"seconds": seconds, "steps": max(lengths), "tokens": sum(lengths),
                              "phases": dict(engine.timings)})
            timed = calls[1:]
            row = {"batch": batch, "seconds": statistics.median(c["seconds"] for c in timed),
                   "per_step_ms": statistics.median(1000 * c["seconds"] / c["steps"] for c in timed),
                   "tokens_per_second": statistics.median(c["tokens"] / c["seconds"] for c in timed), "calls": calls}
            rows.append(row)
            print(f"[sweep] {name:17s} batch {batch:5d}: {row['seconds']:.2f} s, {row['per_step_ms']:.2f} ms a step, "
                  f"{row['tokens_per_second']:,.0f} tok/s", flush=True)
        fixed, per_seq = _line([r["batch"] for r in rows], [r["per_step_ms"] for r in rows])
        result["variants"][name] = {"rows": rows, "fixed_ms_per_step": fixed, "per_sequence_us_per_step": 1000 * per_seq}
        print(f"[sweep] {name}: {fixed:.2f} ms a step + {1000 * per_seq:.2f} us a sequence a step", flush=True)
    vllm.SamplingParams = plain
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_batch_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "vllm_batch_sweep.md").write_text(_markdown(result, batches))
    print(_markdown(result, batches))


def _nested(cls):
    @functools.wraps(cls)
    def make(**kwargs):
        kwargs["flat_logprobs"] = False
        return cls(**kwargs)
    return make


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _markdown(result: dict, batches: list[int]) -> str:
    lines = [f"vLLM {result['vllm']} through grpoflow's engine, {result['model']}, on {result['card']} "
             f"({result['date']}): median seconds of {result['repeats']} generate calls (n = 8, up to "
             f"{result['max_tokens']} tokens); ms per decoding step in brackets.", "",
             "| variant | " + " | ".join(f"{b} completions" for b in batches) + " | fixed ms a step | us a sequence a step |",
             "|---|" + "---|" * (len(batches) + 2)]
    for name, v in result["variants"].items():
        cells = [f"{r['seconds']:.2f} ({r['per_step_ms']:.1f})" for r in v["rows"]]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {v['fixed_ms_per_step']:.2f} | {v['per_sequence_us_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
