"""The pipeline as a Prefect flow: one task per stage, in the order of the DAG.

    prepare (data) ─┐
    model (base)  ──┴─> train ─> evaluate ─> export

Every stage is a plain function in stages/; the tasks here only call them and publish artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (offline Prefect defaults, before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from grpoflow.config import ALL_STAGES, ConfigError, PipelineConfig, validate_config
from grpoflow.models import ModelError, resolve_model
from grpoflow.sources import SourceError
from grpoflow.export.gguf import GGUFExportError
from grpoflow.launch import launch_train
from stages.evaluate import run_evaluate
from stages.export import run_export
from stages.prepare import REJECT_REASONS, DataError, run_prepare
from stages.train import TrainingDiverged, run_train

# What a stage reads; those stages run first (they are content-hash cached, so cheap when done).
NEEDS = {"train": ("prepare", "model"), "evaluate": ("prepare", "model"), "export": ("train",)}

# A user's mistake does not get better by retrying; anything else (I/O, a flaky Hub) may. (The Hub
# push retries its transient errors itself, with backoff.)
USER_ERRORS = (ConfigError, DataError, SourceError, ModelError, TrainingDiverged, GGUFExportError)


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except USER_ERRORS:
        return False
    except Exception:
        return True
    return False


@task(name="prepare-data", retry_condition_fn=_retry_unless_user_error)
def prepare_data(cfg: PipelineConfig) -> dict[str, Any]:
    manifest = run_prepare(cfg.data)
    rows = [{"split": name, "rows": info["rows"], "limited": info["limited"],
             "rejected": manifest.rejected["by_split"].get(name, 0)} for name, info in manifest.splits.items()]
    create_table_artifact(key="data-manifest", table=rows,
                          description=f"{manifest.source['description']} -> {manifest.output_dir}"
                                      f"{' (cached)' if manifest.cached else ''}")
    by_reason = manifest.rejected["by_reason"]
    if by_reason:
        create_table_artifact(key="data-rejects", table=[
            {"reason": reason, "rows": n, "meaning": REJECT_REASONS[reason]} for reason, n in by_reason.items()],
            description=f"rejected rows, kept in {manifest.rejects_path}")
    return {"output_dir": manifest.output_dir, "train": str(manifest.train_path),
            "heldout": str(manifest.heldout_path), "rows": {k: v["rows"] for k, v in manifest.splits.items()},
            "rejected": manifest.rejected["total"], "cached": manifest.cached}


@task(name="base-model", retry_condition_fn=_retry_unless_user_error)
def base_model(cfg: PipelineConfig) -> dict[str, Any]:
    resolved = resolve_model(cfg.model)
    return {"path": resolved.path, "description": resolved.description, "converted": resolved.converted}


@task(name="train", retry_condition_fn=_retry_unless_user_error)
def train(cfg: PipelineConfig, train_path: str, heldout_path: str, model_path: str) -> dict[str, Any]:
    if cfg.orchestration.train_processes > 1:  # torchrun here, in this container or pod: one process per GPU
        result = launch_train(cfg, cfg.orchestration.train_processes)
    else:
        result = run_train(cfg, Path(train_path), Path(heldout_path), model_path, progress=False)
    report = result.report
    warm = report.get("warmup") or {}
    rows = [{"metric": "steps", "value": report["steps"]},
            {"metric": "skipped steps (non-finite)", "value": report["skipped_steps"]},
            {"metric": "reward, first 10 steps", "value": report["reward_first_10"]},
            {"metric": "reward, last 10 steps", "value": report["reward_last_10"]},
            {"metric": "median step seconds", "value": report["step_seconds_median"]}]
    if "format_strict_after" in warm:
        rows += [{"metric": "format warm-up: strict format before", "value": warm["format_strict_before"]},
                 {"metric": "format warm-up: strict format after", "value": warm["format_strict_after"]}]
    create_table_artifact(key="training", table=rows, description=f"GRPO run in {result.output_dir}")
    metrics = Path(result.output_dir) / "metrics.jsonl"
    curve = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if curve:
        keep = ("step", "reward", "reward_std", "frac_reward_zero_std", "loss", "completions/mean_length", "kl")
        create_table_artifact(key="training-curve", table=[{k: r.get(k) for k in keep} for r in curve],
                              description="per-step metrics (the plot: reward.png in the run folder)")
    return {"output_dir": result.output_dir, "model": result.model_dir, "steps": result.steps,
            "reward_first_10": report["reward_first_10"], "reward_last_10": report["reward_last_10"]}


@task(name="evaluate", retry_condition_fn=_retry_unless_user_error)
def evaluate(cfg: PipelineConfig, heldout: str, models: dict[str, str]) -> dict[str, Any]:
    report = run_evaluate(cfg.eval, Path(heldout), models, rollout=cfg.rollout, answer_type=cfg.data.answer_type)
    create_markdown_artifact(key="evaluation", markdown=report.markdown,
                             description=f"held-out evaluation, side by side; per-sample results in {report.output_dir}")
    return {"output_dir": report.output_dir, "models": report.models}


@task(name="export", retry_condition_fn=_retry_unless_user_error)
def export(cfg: PipelineConfig, model_dir: str, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    report = run_export(cfg, Path(model_dir), evaluation=evaluation, token=_hub_token(cfg))
    create_markdown_artifact(key="export", markdown=report.markdown,
                             description=f"exported files, GGUF fidelity against the merged model; {report.output_dir}")
    files = report.report["gguf"]
    return {"output_dir": report.output_dir, "gguf": {f["method"]: f["status"] for f in files},
            "push": report.report["push"], "warnings": len(report.report["warnings"])}


def _hub_token(cfg: PipelineConfig) -> str | None:
    """The token from the Prefect Secret block export.hub_token_secret names; None: HF_TOKEN."""
    if not (cfg.export.push_to_hub and cfg.export.hub_token_secret):
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(cfg.export.hub_token_secret).get()
    except ValueError as e:
        raise ConfigError(f"export.hub_token_secret: no Prefect Secret block named {cfg.export.hub_token_secret!r} "
                          f"({e}); create one in the UI (Blocks > Secret) or with "
                          f"Secret(value=...).save({cfg.export.hub_token_secret!r})") from None


def _run_name() -> str:
    config = flow_run.parameters.get("config") or {}
    model = (config.get("model") or {}).get("name_or_path", "smollm2-135m-instruct")
    data = (config.get("data") or {}).get("source", "gsm8k")
    return f"{model.rsplit('/', 1)[-1]} on {data.rsplit('/', 1)[-1]}"


@flow(name="grpoflow-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the stages listed in orchestration.stages, in DAG order."""
    logger = get_run_logger()
    cfg = validate_config(config or {}, "the flow's config parameter")
    options = {"retries": cfg.orchestration.retries, "retry_delay_seconds": cfg.orchestration.retry_delay_seconds}
    wanted = set(cfg.orchestration.stages)
    for stage in list(wanted):
        for need in NEEDS.get(stage, ()):
            if need not in wanted:
                logger.info("stage %r reads the output of %r: running that too", stage, need)
                wanted.add(need)
    results: dict[str, Any] = {}

    if "prepare" in wanted:
        results["prepare"] = prepare_data.with_options(**options)(cfg)
    if "model" in wanted:
        results["model"] = base_model.with_options(**options)(cfg)
    if "train" in wanted:
        results["train"] = train.with_options(**options)(
            cfg, results["prepare"]["train"], results["prepare"]["heldout"], results["model"]["path"])
    if "evaluate" in wanted:
        models = {"base": results["model"]["path"]}
        if "train" in results:
            models["trained"] = results["train"]["model"]
        results["evaluate"] = evaluate.with_options(**options)(cfg, results["prepare"]["heldout"], models)
    if "export" in wanted:
        evaluation = results.get("evaluate", {}).get("models")
        results["export"] = export.with_options(**options)(cfg, results["train"]["model"], evaluation)

    create_markdown_artifact(key="pipeline-summary", markdown=_summary(cfg, results),
                             description="what this pipeline run did")
    return results


def _summary(cfg: PipelineConfig, results: dict[str, Any]) -> str:
    lines = ["| stage | result |", "|---|---|"]
    for stage in [s for s in ALL_STAGES if s in results]:
        r = results[stage]
        if stage == "prepare":
            text = (f"{r['rows']['train']:,} train / {r['rows']['heldout']:,} held-out rows, "
                    f"{r['rejected']} rejected{' (cached)' if r['cached'] else ''} -> `{r['output_dir']}`")
        elif stage == "model":
            text = f"{r['description']} -> `{r['path']}`"
        elif stage == "train":
            text = (f"{r['steps']} GRPO steps, reward {_fmt(r['reward_first_10'])} (first 10) -> "
                    f"{_fmt(r['reward_last_10'])} (last 10) -> `{r['model']}`")
        elif stage == "evaluate":
            text = "; ".join(f"{label}: accuracy {100 * f['accuracy']:.1f}%, last number "
                             f"{100 * f['accuracy_last_number']:.1f}%, strict format {100 * f['format_strict']:.1f}% "
                             f"on {f['scored']}" for label, f in r["models"].items())
        else:
            text = (", ".join(f"{m} {status}" for m, status in r["gguf"].items()) + f"; {r['warnings']} warning(s)"
                    + (f"; pushed to {r['push']['repo_url']}" if r["push"] else "") + f" -> `{r['output_dir']}`")
        lines.append(f"| {stage} | {text} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
