"""What each stage shows in the Prefect UI: artifacts made from the files the stages write.

    data-manifest, data-rejects       rows per split, rejects by reason
    training, training-curve          the run's figures; reward, loss, KL ... per step as a table
    training-curves                   reward and loss against the step, as an image
    training-eval, training-eval-curve  held-out figures during training (grpo.eval_strategy), the best checkpoint
    sampled-completions               the last logged completions with their rewards
    evaluation                        the models side by side on the held-out set
    export                            files, fidelity, push

Stages know nothing of Prefect; these read their outputs (metrics.jsonl, completions.jsonl, reports).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from grpoflow.jsonl import read_records
from stages.prepare import REJECT_REASONS, Manifest

CURVE_KEYS = ("step", "reward", "reward_std", "frac_reward_zero_std", "loss", "kl", "entropy", "grad_norm",
              "completions/mean_length")
COMPLETION_CHARS = 400  # a completion longer than this is cut in the table (the file has it whole)


def publish_manifest(manifest: Manifest, key_prefix: str = "data") -> None:
    rows = [{"split": name, "rows": info["rows"], "limited": info["limited"],
             "rejected": manifest.rejected["by_split"].get(name, 0)} for name, info in manifest.splits.items()]
    create_table_artifact(key=f"{key_prefix}-manifest", table=rows,
                          description=f"{manifest.source['description']} -> {manifest.output_dir}"
                                      f"{' (cached)' if manifest.cached else ''}")
    by_reason = manifest.rejected["by_reason"]
    if by_reason:
        create_table_artifact(key=f"{key_prefix}-rejects", table=[
            {"reason": reason, "rows": n, "meaning": REJECT_REASONS[reason]} for reason, n in by_reason.items()],
            description=f"rejected rows, kept in {manifest.rejects_path}")


def _reward_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The reward at the start and the end of the run, over windows that do not overlap (a report.json
    written before they were, with reward_first_10 / reward_last_10, as it was)."""
    if "reward_window" not in report:
        return [{"metric": "reward, first 10 steps", "value": report.get("reward_first_10")},
                {"metric": "reward, last 10 steps", "value": report.get("reward_last_10")}]
    n = report["reward_window"]
    return [{"metric": f"reward, first {n} steps", "value": report["reward_first"]},
            {"metric": f"reward, last {n} steps", "value": report["reward_last"]},
            {"metric": "reward change (last - first)", "value": report["reward_change"]}]


def publish_training(output_dir: str, report: dict[str, Any], first_step: int = 1) -> None:
    """`first_step`: the number the run's step 1 has along a lineage (continuous rounds)."""
    from grpoflow.train.log import is_eval_record  # torch: imported when a run has trained, not with the flows

    warm = report.get("warmup") or {}
    rows = [{"metric": "steps", "value": report["steps"]},
            {"metric": "skipped steps (non-finite)", "value": report["skipped_steps"]},
            *_reward_rows(report),
            {"metric": "median step seconds", "value": report["step_seconds_median"]}]
    if "format_strict_after" in warm:
        rows += [{"metric": "format warm-up: strict format before", "value": warm["format_strict_before"]},
                 {"metric": "format warm-up: strict format after", "value": warm["format_strict_after"]}]
    create_table_artifact(key="training", table=rows, description=f"GRPO run in {output_dir}")
    folder = Path(output_dir)
    records = _jsonl(folder / "metrics.jsonl")
    curve = [r for r in records if not is_eval_record(r)]
    if curve:
        shift = first_step - 1
        table = [{k: (r.get(k) + shift if k == "step" else r.get(k)) for k in CURVE_KEYS} for r in curve]
        create_table_artifact(key="training-curve", table=table, description=f"per-step metrics ({folder}/metrics.jsonl)")
        png = plot_curves(table, folder / "curves.png")
        encoded = base64.b64encode(png.read_bytes()).decode()
        create_markdown_artifact(key="training-curves", markdown=f"![reward and loss per step](data:image/png;base64,{encoded})",
                                 description=f"reward and loss per step ({png})")
    evals = [r for r in records if is_eval_record(r)]
    if evals:
        publish_training_eval(evals, report, folder, first_step)
    completions = _jsonl(folder / "completions.jsonl")
    if completions:
        last = max(c["step"] for c in completions)
        create_table_artifact(key="sampled-completions", table=[
            {"step": c["step"] + first_step - 1, "prompt": _last_user_message(c.get("prompt")),
             "completion": _cut(c.get("completion", "")), "answer": c.get("answer"), "reward": c.get("reward"),
             "advantage": c.get("advantage")}
            for c in completions if c["step"] == last], description=f"completions of step {last + first_step - 1} "
                                                                   f"with their rewards ({folder}/completions.jsonl)")


def publish_training_eval(evals: list[dict[str, Any]], report: dict[str, Any], folder: Path, first_step: int) -> None:
    """The held-out figures at each evaluation during training, and eval.png with the best checkpoint."""
    shift, best = first_step - 1, report.get("best_global_step")
    table = [{"step": r["step"] + shift, "accuracy": _pct_ci(r["eval_accuracy"], r["eval_accuracy_ci95"]),
              "accuracy (last number)": _pct_ci(r["eval_accuracy_last_number"], r["eval_accuracy_last_number_ci95"]),
              "strict format": r["eval_format_strict"], "reward": r["eval_reward"],
              "best": "best" if r["step"] == best else ""} for r in evals]
    chosen = (f"; best checkpoint: step {best + shift} ({report['metric_for_best_model']} {report['best_metric']:.4f}, "
              f"{report['best_model_checkpoint']})" if best is not None else "")
    create_table_artifact(key="training-eval", table=table,
                          description=f"held-out figures during training, {evals[-1]['eval_scored']} questions, "
                                      f"greedy; 95% intervals{chosen}; final/ is step "
                                      f"{report.get('final_model_step', evals[-1]['step']) + shift}'s model")
    plot = report.get("eval_plot")
    if plot and Path(plot).is_file():
        encoded = base64.b64encode(Path(plot).read_bytes()).decode()
        create_markdown_artifact(key="training-eval-curve",
                                 markdown=f"![held-out figures per evaluation](data:image/png;base64,{encoded})",
                                 description=f"held-out accuracy (95% intervals), format and reward ({plot})")


def _pct_ci(p: float, ci: list[float]) -> str:
    return f"{100 * p:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def publish_evaluation(markdown: str, output_dir: str, title: str = "held-out evaluation, side by side") -> None:
    create_markdown_artifact(key="evaluation", markdown=markdown,
                             description=f"{title}; per-sample results in {output_dir}")


def publish_export(markdown: str, output_dir: str) -> None:
    create_markdown_artifact(key="export", markdown=markdown,
                             description=f"exported files, GGUF fidelity against the merged model; {output_dir}")


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax.plot(steps, [r.get("reward") for r in records], marker="o", lw=2, label="reward")
    ax.set_xlabel("step")
    ax.set_title("reward")
    ax2.plot(steps, [r.get("loss") for r in records], marker="o", lw=2, color="tab:red", label="loss")
    ax2.set_xlabel("step")
    ax2.set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return read_records(path)  # the records written whole: a line being written is not read half


def _last_user_message(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return _cut(users[-1] if users else "")
    return _cut(str(prompt or ""))


def _cut(text: str) -> str:
    return text if len(text) <= COMPLETION_CHARS else text[:COMPLETION_CHARS] + " …"
