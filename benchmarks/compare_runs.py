"""Several training runs side by side: one plot of their curves and the tables RESULTS.md records.

    python benchmarks/compare_runs.py --out benchmarks/results/X --name losses \
        dapo=/tmp/losses/dapo/metrics.jsonl cispo=/tmp/losses/cispo/metrics.jsonl sapo=...

Each NAME=PATH is a metrics.jsonl: grpoflow's (a line a step, and a line an evaluation during training
with eval_* keys) or TRL's log history as benchmarks/trl_recipe.py writes it (trl_metrics.jsonl; TRL's
metric names are ours). Writes <out>/<name>.png (held-out accuracy with its 95% band and strict format
against the step, where the run evaluated during training; the training reward and its correctness
part, as moving means of 10 steps) and prints two markdown tables: the held-out curve, a column a
run, and each run's training figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

WINDOW = 10  # steps in the moving mean of the training curves


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """(training steps, evaluations during training) of one metrics.jsonl."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON line ({e})") from None
    steps, evals = [], []
    for r in records:
        if any(k.startswith("eval_") for k in r):
            evals.append(r)
        elif "reward" in r:  # TRL's history ends with a summary line that has none
            steps.append(_numbers(r))
    return steps, evals


def _numbers(record: dict) -> dict:
    """TRL logs its figures as strings ('0.5'); ours are numbers."""
    out = {}
    for k, v in record.items():
        try:
            out[k] = float(v) if isinstance(v, str) else v
        except ValueError:
            out[k] = v
    return out


def moving_mean(values: list[float], window: int = WINDOW) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def _pct(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def tables(runs: dict[str, tuple[list[dict], list[dict]]]) -> str:
    """The held-out curve (a row a step, a column a run) and the training figures (a row a run)."""
    names = [n for n, (_, evals) in runs.items() if evals]
    lines = []
    if names:
        lines += ["| step | " + " | ".join(f"{n}: accuracy (strict format)" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        at = {n: {e["step"]: e for e in runs[n][1]} for n in names}
        for step in sorted({s for n in names for s in at[n]}):
            cells = []
            for n in names:
                e = at[n].get(step)
                cells.append("-" if e is None else f"{_pct(e['eval_accuracy'], e.get('eval_accuracy_ci95'))} "
                                                   f"({_pct(e.get('eval_format_strict'))})")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| run | steps | reward, first 10 -> last 10 | correctness reward, first 10 -> last 10 | "
              "frac_reward_zero_std (mean) | step s (median) |", "|---|---|---|---|---|---|"]
    for n, (steps, _) in runs.items():
        if not steps:
            lines.append(f"| {n} | 0 | - | - | - | - |")
            continue
        first, last = steps[:WINDOW], steps[-WINDOW:]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        seconds = [s.get("step_seconds", s.get("step_time")) for s in steps[1:] or steps]
        seconds = [s for s in seconds if s is not None]
        lines.append(
            f"| {n} | {len(steps)} | {fmt(_mean(s['reward'] for s in first))} -> {fmt(_mean(s['reward'] for s in last))} | "
            f"{fmt(_mean(s.get('rewards/correctness/mean') for s in first))} -> "
            f"{fmt(_mean(s.get('rewards/correctness/mean') for s in last))} | "
            f"{fmt(_mean(s.get('frac_reward_zero_std') for s in steps))} | "
            f"{fmt(statistics.median(seconds) if seconds else None)} |")
    return "\n".join(lines)


def clock(steps: list[dict]) -> dict[int, float]:
    """step -> training seconds when it ended (the sum of step times; evaluations during training and
    start-up left out), step 0 at 0."""
    at, total = {0: 0.0}, 0.0
    for s in steps:
        total += s.get("step_seconds", s.get("step_time")) or 0.0
        at[int(s["step"])] = total
    return at


def plot(runs: dict[str, tuple[list[dict], list[dict]]], path: Path, title: str, x: str = "step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_out = any(evals for _, evals in runs.values())  # the held-out panels only where a run evaluated
    fig, axes = plt.subplots(1, 4 if held_out else 2, figsize=(19 if held_out else 10, 4))
    acc, fmt, train, correct = axes if held_out else (None, None, *axes)
    for n, (steps, evals) in runs.items():
        when = clock(steps) if x == "seconds" else None
        at = (lambda step: when.get(int(step))) if when else (lambda step: step)  # noqa: E731
        if evals:
            xs = [at(e["step"]) for e in evals]
            line, = acc.plot(xs, [e["eval_accuracy"] for e in evals], marker="o", lw=2, label=n)
            if all(e.get("eval_accuracy_ci95") for e in evals):
                acc.fill_between(xs, [e["eval_accuracy_ci95"][0] for e in evals],
                                 [e["eval_accuracy_ci95"][1] for e in evals], color=line.get_color(), alpha=0.12)
            fmt.plot(xs, [e.get("eval_format_strict") for e in evals], marker="o", lw=2, label=n,
                     color=line.get_color())
        if steps:
            xs = [at(s["step"]) for s in steps]
            line, = train.plot(xs, moving_mean([s["reward"] for s in steps]), lw=2, label=n)
            if all(s.get("rewards/correctness/mean") is not None for s in steps):
                correct.plot(xs, moving_mean([s["rewards/correctness/mean"] for s in steps]), lw=2,
                             color=line.get_color(), label=n)
    if held_out:
        acc.set_title("held-out accuracy (bands: 95% intervals)")
        fmt.set_title("held-out strict format")
        fmt.set_ylim(-0.05, 1.05)
    train.set_title(f"training reward (mean of {WINDOW} steps)")
    correct.set_title(f"training correctness reward (mean of {WINDOW} steps)")
    for a in axes:
        a.set_xlabel("training seconds (step times summed)" if x == "seconds" else "step")
        a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=METRICS_JSONL")
    parser.add_argument("--out", type=Path, required=True, help="folder for <name>.png")
    parser.add_argument("--name", default="runs", help="the plot's file name, without .png")
    parser.add_argument("--title", default="", help="the plot's title")
    parser.add_argument("--x", choices=["step", "seconds"], default="step",
                        help="the curves against the step, or against training seconds (the step times summed: "
                             "to compare runs whose steps cost differently, async against sync)")
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{item!r}: expected NAME=PATH to a metrics.jsonl")
        if not Path(path).is_file():
            raise SystemExit(f"{name}: {path} not found")
        runs[name] = load(Path(path))
    args.out.mkdir(parents=True, exist_ok=True)
    print(tables(runs))
    print(f"\nplot: {plot(runs, args.out / f'{args.name}.png', args.title, args.x)}")


if __name__ == "__main__":
    main()
