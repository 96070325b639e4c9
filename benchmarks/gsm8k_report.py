"""Summarise a recipe run (benchmarks/gsm8k_gpu.sh, any config) into the figures RESULTS.md records.

    python benchmarks/gsm8k_report.py --run /tmp/run [--out $OUT] [--name chain-sum]

Reads the training folder (report.json, metrics.jsonl with its evaluations during training,
reward.png, eval.png) and the evaluation figures (eval/models/*/figures.json), prints one JSON
summary and, with --out, writes it as <name>_summary.json and copies the curves and the per-step
metrics beside it so they come back from the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path


def summarise(run: Path) -> dict:
    train = sorted(run.glob("train/*/metrics.jsonl"))
    if not train:
        raise SystemExit(f"{run}/train/*/metrics.jsonl not found: has the train phase run?")
    folder = train[-1].parent
    records = [json.loads(line) for line in train[-1].read_text().splitlines()]
    steps = [s for s in records if not any(k.startswith("eval_") for k in s)]
    evals = [s for s in records if any(k.startswith("eval_") for k in s)]  # evaluations during training
    later = steps[1:] or steps  # step 1 holds one-off costs (kernel selection, allocator growth)
    final = folder / "final" / "report.json"
    summary = {
        "train_folder": str(folder),
        "steps": len(steps),
        "finished": final.is_file(),
        "warmup": json.loads(final.read_text())["warmup"] if final.is_file() else None,
        "reward_first_10": _mean(s["reward"] for s in steps[:10]),
        "reward_last_10": _mean(s["reward"] for s in steps[-10:]),
        "strict_format_reward_first_10": _mean(s.get("rewards/strict_format/mean") for s in steps[:10]),
        "strict_format_reward_last_10": _mean(s.get("rewards/strict_format/mean") for s in steps[-10:]),
        "frac_reward_zero_std_mean": _mean(s.get("frac_reward_zero_std") for s in steps),
        "step_seconds_median": statistics.median(s["step_seconds"] for s in later),
        "generation_tokens_per_second_median": statistics.median(s["generation/tokens_per_second"] for s in later),
        "train_tokens_per_second_median": _median(s.get("train/tokens_per_second") for s in later),
        "completion_length_mean": _mean(s["completions/mean_length"] for s in steps),
        "peak_memory_gib_max": max((s.get("memory/peak_gib", 0.0) for s in steps), default=None),
        "skipped_steps": steps[-1].get("skipped_steps"),
        # a run with tools (rollout.environment: python_tool): how often the model called one, and how often it failed
        "tool_call_frequency_first_10": _mean(s.get("tools/call_frequency") for s in steps[:10]),
        "tool_call_frequency_last_10": _mean(s.get("tools/call_frequency") for s in steps[-10:]),
        "tool_failure_frequency_last_10": _mean(s.get("tools/failure_frequency") for s in steps[-10:]),
        "mean_turns_last_10": _mean(s.get("completions/mean_turns") for s in steps[-10:]),
        "evaluations": {},
        "eval_curve": [{k: e.get(k) for k in ("step", "eval_scored", "eval_accuracy", "eval_accuracy_ci95",
                                               "eval_accuracy_last_number", "eval_accuracy_last_number_ci95",
                                               "eval_format_strict", "eval_reward", "eval_tool_call_rate",
                                               "eval_tool_errors")} for e in evals],
    }
    for figures in sorted(run.glob("eval/models/*/figures.json")):
        f = json.loads(figures.read_text())
        summary["evaluations"][f["model"]] = {k: f.get(k) for k in (
            "scored", "accuracy", "accuracy_ci95", "accuracy_last_number", "accuracy_last_number_ci95",
            "format_strict", "format_soft", "mean_completion_tokens", "truncated", "seconds",
            "mean_turns", "tool_calls", "tool_errors", "tool_call_rate", "tool_call_rate_ci95")}
    return summary


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="gsm8k", help="the summary file's name: <name>_summary.json")
    args = parser.parse_args()
    summary = summarise(args.run)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        folder = Path(summary["train_folder"])
        for name in ("metrics.jsonl", "reward.png", "eval.png"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, args.out / f"{args.name}-{name}")


if __name__ == "__main__":
    main()
