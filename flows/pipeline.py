"""The pipeline as a Prefect flow: one task per stage, in the order of the DAG.

    prepare (data) ─┐
    model (base)  ──┴─> train ─> evaluate ─> export

Every stage is a plain function in stages/; the tasks here only call them and publish artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flows  # noqa: F401  (offline Prefect defaults, before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.monitoring import publish_evaluation, publish_export, publish_manifest, publish_training
from flows.retry import retry_options, retry_unless_user_error
from flows.secrets import hub_token
from grpoflow.config import ALL_STAGES, ConfigError, PipelineConfig, validate_config
from grpoflow.launch import launch_train
from grpoflow.models import resolve_model
from stages.evaluate import run_evaluate
from stages.export import run_export
from stages.prepare import run_prepare
from stages.train import run_train

# What a stage reads; those stages run first (they are content-hash cached, so cheap when done).
NEEDS = {"train": ("prepare", "model"), "evaluate": ("prepare", "model"), "export": ("train",)}


def stages_to_run(requested: list[str]) -> list[str]:
    """The requested stages and everything they read, transitively, in DAG order."""
    wanted, todo = set(), list(requested)
    while todo:
        stage = todo.pop()
        if stage not in wanted:
            wanted.add(stage)
            todo.extend(NEEDS.get(stage, ()))
    return [s for s in ALL_STAGES if s in wanted]


@task(name="prepare-data", retry_condition_fn=retry_unless_user_error)
def prepare_data(cfg: PipelineConfig) -> dict[str, Any]:
    manifest = run_prepare(cfg.data)
    publish_manifest(manifest)
    return {"output_dir": manifest.output_dir, "train": str(manifest.train_path),
            "heldout": str(manifest.heldout_path), "rows": {k: v["rows"] for k, v in manifest.splits.items()},
            "rejected": manifest.rejected["total"], "cached": manifest.cached}


@task(name="base-model", retry_condition_fn=retry_unless_user_error)
def base_model(cfg: PipelineConfig) -> dict[str, Any]:
    resolved = resolve_model(cfg.model)
    return {"path": resolved.path, "description": resolved.description, "converted": resolved.converted}


@task(name="train", retry_condition_fn=retry_unless_user_error)
def train(cfg: PipelineConfig, train_path: str, heldout_path: str, model_path: str) -> dict[str, Any]:
    if cfg.orchestration.train_processes > 1:  # torchrun here, in this container or pod: one process per GPU
        result = launch_train(cfg, cfg.orchestration.train_processes)
    else:
        result = run_train(cfg, Path(train_path), Path(heldout_path), model_path, progress=False)
    report = result.report
    publish_training(result.output_dir, report)
    return {"output_dir": result.output_dir, "model": result.model_dir, "steps": result.steps,
            "reward_first_10": report["reward_first_10"], "reward_last_10": report["reward_last_10"]}


@task(name="evaluate", retry_condition_fn=retry_unless_user_error)
def evaluate(cfg: PipelineConfig, heldout: str, models: dict[str, str]) -> dict[str, Any]:
    report = run_evaluate(cfg.eval, Path(heldout), models, rollout=cfg.rollout, answer_type=cfg.data.answer_type)
    publish_evaluation(report.markdown, report.output_dir)
    return {"output_dir": report.output_dir, "models": report.models}


@task(name="export", retry_condition_fn=retry_unless_user_error)
def export(cfg: PipelineConfig, model_dir: str, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    report = run_export(cfg, Path(model_dir), evaluation=evaluation, token=hub_token(cfg))
    publish_export(report.markdown, report.output_dir)
    files = report.report["gguf"]
    return {"output_dir": report.output_dir, "gguf": {f["method"]: f["status"] for f in files},
            "push": report.report["push"], "warnings": len(report.report["warnings"])}


def _run_name() -> str:
    """'<model> on <dataset>, steps 1-10': what the run trains (the stages it runs are its task runs)."""
    try:
        cfg = validate_config(flow_run.parameters.get("config") or {})
    except ConfigError:
        return "invalid config"  # the flow fails at once and says why
    name = f"{_short(cfg.model.name_or_path)} on {_short(cfg.data.source)}"
    if "train" in cfg.orchestration.stages or "export" in cfg.orchestration.stages:
        name += f", steps 1-{cfg.grpo.max_steps}"
    return name


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


@flow(name="grpoflow-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the stages listed in orchestration.stages, in DAG order."""
    logger = get_run_logger()
    cfg = validate_config(config or {}, "the flow's config parameter")
    options = retry_options(cfg.orchestration)
    wanted = stages_to_run(cfg.orchestration.stages)
    added = [s for s in wanted if s not in cfg.orchestration.stages]
    if added:
        logger.info("stages %s read the output of %s: running those too", cfg.orchestration.stages, added)
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
