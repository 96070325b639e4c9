"""Data-parallel scaling: the same GRPO run on 1 GPU and on N GPUs, with the same global batch.

    # on the 2-GPU machine, staged by benchmarks/stage_gpu.sh (the GPU lock's packages in /tmp/site,
    # GSM8K in /tmp/gsm8k, SmolLM2 converted to /tmp/smollm2):
    PYTHONPATH=$PWD:/tmp/site python benchmarks/ddp_gpu.py --out $OUT
    # here, on CPU: 2 gloo processes, a tiny random model, a few steps
    python benchmarks/ddp_gpu.py --smoke --out /tmp/ddp-smoke
    # the N-process run sharded with FSDP2 (grpo.distributed: fsdp) instead of DDP replicas
    PYTHONPATH=$PWD:/tmp/site python benchmarks/ddp_gpu.py --distributed fsdp --out $OUT

Each run is `grpoflow train` (1 process) or `torchrun --standalone --nproc-per-node N -m grpoflow.cli
train` with per_device_train_batch_size = global batch / N (with --micro-batch M: M, and the rest
accumulated, gradient_accumulation_steps = steps_per_generation = global batch / N / M; one optimizer
step a generation either way): SmolLM2-135M-Instruct, full fine-tuning,
bf16, the transformers engine (--engine vllm: a colocated vLLM per process, staged as in
benchmarks/stage_gpu.sh, with PYTHONPATH=$PWD:/tmp/site), 8 prompts x 8 completions x up to 256
tokens a step, 10 steps, no format warm-up (--warmup: the config's, on every process). The
transformers engine samples with a seed per prompt, so both runs start from the same completions
(vLLM only with --set rollout.seed_per_prompt=true); bf16 kernels on other batch shapes then let
them drift apart ("within noise").

Writes to --out (names end in -TAG with --tag): ddp_scaling.json (settings, per-run throughput, per-step curves and their
differences), ddp_scaling.md (the tables for benchmarks/RESULTS.md: throughput, and where a step's time
went: train, optimizer, weight sync and the engine's phases), ddp_scaling.png (loss and
reward against the step, both runs) and each run's metrics-<processes>.jsonl; fsdp_scaling.* and
metrics-fsdp-<processes>.jsonl with --distributed fsdp (the 1-process run is the same either way).
Throughput leaves out the first step (CUDA start-up): completion tokens/s = sum of the steps'
completion tokens / sum of their step_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "artifacts/ddp-benchmark")))
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny random model: checks the script")
    parser.add_argument("--processes", type=int, default=2, help="GPUs of the data-parallel run (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 10; smoke 3)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts a step, all GPUs (default 8; smoke 2)")
    parser.add_argument("--generations", type=int, default=None, help="completions a prompt (default 8; smoke 4)")
    parser.add_argument("--tokens", type=int, default=None, help="max_completion_length (default 256; smoke 8)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="completions a forward/backward on a GPU (default: all of its share at once); the "
                             "rest is gradient accumulation, so one optimizer step a generation either way")
    parser.add_argument("--model", default=os.environ.get("MODEL", "/tmp/smollm2"))
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="rollouts: transformers generate, or a colocated vLLM in every process (staged vLLM)")
    parser.add_argument("--data", default=os.environ.get("GSM8K", "/tmp/gsm8k"), help="GSM8K folder (train/test.jsonl)")
    parser.add_argument("--finetune", default="full", choices=["full", "lora"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both runs (e.g. rollout.seed_per_prompt=true)")
    parser.add_argument("--warmup", action="store_true",
                        help="the config's format warm-up first (on every process), so rewards and curves carry signal")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--distributed", default="ddp", choices=["ddp", "fsdp"],
                        help="the N-process run: DDP replicas, or FSDP2 shards (grpo.distributed)")
    args = parser.parse_args()
    smoke = args.smoke
    steps = args.steps or (3 if smoke else 10)
    prompts = args.prompts or (2 if smoke else 8)
    G = args.generations or (4 if smoke else 8)
    tokens = args.tokens or (8 if smoke else 256)
    N = args.processes
    if (prompts * G) % N or prompts % N:
        parser.error(f"--prompts {prompts} must split evenly over --processes {N} (a prompt's group stays on one GPU)")
    if args.micro_batch and (prompts * G // N) % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide each GPU's {prompts * G // N} completions")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ddp-bench-", dir="/tmp"))
    if smoke:
        # a reward random text varies on (its length), so the loss and the gradients are not 0
        model, data, base = _tiny_model(work), _tiny_data(work), [
            "--set", "model.dtype=float32", "--set", "data.answer_format=plain",
            "--set", 'grpo.reward_funcs=["length_penalty(max_chars=5, per_char=0.01)"]']
    else:
        model, data, base = args.model, args.data, ["-c", "configs/gsm8k-gpu.yaml"]

    common = [*base, "--set", f"model.name_or_path={model}", "--set", f"data.source={data}",
              "--set", f"data.output_dir={work / 'data'}", "--set", f"model.finetune={args.finetune}",
              "--set", f"rollout.engine={args.engine}", "--set", f"grpo.distributed={args.distributed}",
              "--set", f"grpo.warmup.enabled={str(args.warmup).lower()}",
              "--set", f"grpo.max_steps={steps}", "--set", f"grpo.num_generations={G}",
              "--set", f"grpo.max_completion_length={tokens}", "--set", f"grpo.save_steps={steps}",
              "--set", "grpo.log_completions_steps=1000000", *[a for kv in args.set for a in ("--set", kv)]]
    suffix = f"-{args.tag}" if args.tag else ""
    runs = {}
    for n in (1, N):
        share = prompts * G // n  # completions a process generates and trains on, each step
        per_device = args.micro_batch or share
        accumulation = share // per_device
        cmd = [sys.executable, "-m", "grpoflow.cli", "train"]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "-m", "grpoflow.cli", "train"]
        cmd += [*common, "--set", f"grpo.per_device_train_batch_size={per_device}",
                "--set", f"grpo.gradient_accumulation_steps={accumulation}",
                "--set", f"grpo.steps_per_generation={accumulation}", "--set", f"grpo.output_dir={work / f'train-{n}'}"]
        print(f"[ddp_gpu] {n} process(es): per_device_train_batch_size {per_device} x {accumulation} accumulated "
              f"-> {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(f"[ddp_gpu] the {n}-process run failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        report = json.loads(done.stdout[done.stdout.rfind("\n{") + 1:])  # the last JSON document: the report
        shutil.copy(report["metrics"], args.out / f"metrics{'-fsdp' if args.distributed == 'fsdp' else ''}-{n}{suffix}.jsonl")
        history = [json.loads(line) for line in Path(report["metrics"]).read_text().splitlines()]
        runs[n] = _summary(history, prompts * G, wall, share)
    shutil.rmtree(work)  # checkpoints of full fine-tuning: GBs

    one, many = runs[1], runs[N]
    curves = {key: {"1": [r[key] for r in one["curve"]], str(N): [r[key] for r in many["curve"]]}
              for key in ("loss", "reward")}
    difference = {key: [abs(a - b) for a, b in zip(v["1"], v[str(N)])] for key, v in curves.items()}
    result = {
        "settings": {"smoke": smoke, "model": str(model), "finetune": args.finetune, "engine": args.engine,
                     "distributed": args.distributed,
                     "processes": N, "steps": steps, "prompts_per_step": prompts, "num_generations": G,
                     "max_completion_length": tokens, "global_batch": prompts * G, "micro_batch": args.micro_batch,
                     "device": _device(), "date": time.strftime("%Y-%m-%d"), "overrides": args.set, "warmup": args.warmup},
        "runs": {str(n): {k: v for k, v in r.items() if k != "curve"} for n, r in runs.items()},
        "scaling": {"completion_tokens_per_second": many["completion_tokens_per_second"]
                    / one["completion_tokens_per_second"],
                    "steps_per_second": many["steps_per_second"] / one["steps_per_second"]},
        "curves": curves,
        "difference": {key: {"per_step": d, "max": max(d), "mean": sum(d) / len(d)} for key, d in difference.items()},
    }
    name = f"{args.distributed}_scaling{suffix}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(_markdown(result))
    _plot(result, args.out / f"{name}.png")
    print(_markdown(result))
    return 0


def _summary(history: list[dict], completions_per_step: int, wall: float, per_device: int) -> dict:
    timed = history[1:] or history  # the first step pays for CUDA start-up
    seconds = sum(r["step_seconds"] for r in timed)
    tokens = sum(r["completions/mean_length"] * completions_per_step for r in timed)
    # where a step's time went: train, optimizer, weight sync, and the engine's phases of generation
    phases = sorted({k for r in timed for k in r if k.startswith("time/")})
    return {"completions_per_device": per_device, "steps": len(history), "wall_seconds": wall,
            "timed_steps": len(timed), "step_seconds_mean": seconds / len(timed),
            "generation_seconds_mean": sum(r["generation/seconds"] for r in timed) / len(timed),
            "phases_seconds_mean": {k.removeprefix("time/").removesuffix("_seconds"):
                                    sum(r.get(k) or 0.0 for r in timed) / len(timed) for k in phases},
            "steps_per_second": len(timed) / seconds, "completion_tokens_per_second": tokens / seconds,
            "peak_gib": max((r.get("memory/peak_gib", 0.0) for r in history), default=0.0),
            "curve": [{"step": r["step"], "loss": r["loss"], "reward": r["reward"]} for r in history]}


def _markdown(result: dict) -> str:
    s, N = result["settings"], str(result["settings"]["processes"])
    lines = [f"Data-parallel GRPO ({s['distributed'].upper()} on {N}), {s['model']} ({s['finetune']}, {s['engine']} "
             f"engine), {s['prompts_per_step']} "
             f"prompts x {s['num_generations']} completions x up to {s['max_completion_length']} tokens a step, "
             f"{s['steps']} steps, on {s['device']} ({s['date']}); throughput over steps 2..{s['steps']}.", "",
             "| processes | per-device batch | step s | generation s | steps/s | completion tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for n, r in result["runs"].items():
        lines.append(f"| {n} | {r['completions_per_device']} | {r['step_seconds_mean']:.2f} | "
                     f"{r['generation_seconds_mean']:.2f} | {r['steps_per_second']:.3f} | "
                     f"{r['completion_tokens_per_second']:.0f} | {r['peak_gib']:.2f} |")
    phases = list(dict.fromkeys(k for r in result["runs"].values() for k in r["phases_seconds_mean"]))
    lines += ["", "Where a step's time went, seconds (mean of the timed steps):", "",
              "| processes | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for n, r in result["runs"].items():
        lines.append(f"| {n} | " + " | ".join(f"{r['phases_seconds_mean'].get(k, 0.0):.3f}" for k in phases) + " |")
    sc, d = result["scaling"], result["difference"]
    lines += ["", f"Scaling {N} vs 1: {sc['completion_tokens_per_second']:.2f}x completion tokens/s, "
                  f"{sc['steps_per_second']:.2f}x steps/s.",
              f"Curves, |{N} - 1| per step: loss max {d['loss']['max']:.4f} (mean {d['loss']['mean']:.4f}), "
              f"reward max {d['reward']['max']:.4f} (mean {d['reward']['mean']:.4f}).", ""]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("loss", "reward")):
        for n, values in result["curves"][key].items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=f"{n} process(es)")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.suptitle(f"same global batch ({result['settings']['global_batch']} completions a step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU (gloo)"


def _tiny_model(work: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (as tests/conftest.py's tiny_model)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpoflow.base_model import PACKAGED_MODELS

    packaged = PACKAGED_MODELS["smollm2-135m-instruct"]
    tokenizer = AutoTokenizer.from_pretrained(importlib.util.find_spec(packaged.package).submodule_search_locations[0],
                                              gguf_file=packaged.gguf_file)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    folder = work / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_data(work: Path) -> Path:
    path = work / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(40)))
    return path


if __name__ == "__main__":
    sys.exit(main())
