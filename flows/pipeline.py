"""The pipeline as a Prefect flow: one task per stage, in the order of the DAG.

    prepare (data) ─┐
    model (base)  ──┴─> train ─> evaluate ─> export

Every stage is a plain function in stages/, and the DAG is declared in stages/dag.py; the one task
here runs a stage through it and publishes its artifacts.
"""

from __future__ import annotations

from typing import Any

import flows  # noqa: F401  (offline Prefect defaults, before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.monitoring import publish_evaluation, publish_export, publish_manifest, publish_training
from flows.retry import retry_options, retry_unless_user_error
from flows.secrets import hub_token
from grpoflow.config import ConfigError, PipelineConfig, validate_config
from grpoflow.stopping import keep_graceful_stop
from stages.dag import Results, StageOptions, run_stage, stages_to_run, summary_line

TASK_NAMES = {"prepare": "prepare-data", "model": "base-model", "train": "train", "evaluate": "evaluate",
              "export": "export"}
# What each stage shows in the Prefect UI (artifacts) once it is done.
PUBLISH = {
    "prepare": publish_manifest,
    "train": lambda result: publish_training(result.output_dir, result.report),
    "evaluate": lambda report: publish_evaluation(report.markdown, report.output_dir),
    "export": lambda report: publish_export(report.markdown, report.output_dir),
}


@task(retry_condition_fn=retry_unless_user_error)
def stage_task(stage: str, cfg: PipelineConfig, results: Results) -> Any:
    """One stage of the DAG as a Prefect task; the Hub token is read here, never passed as a parameter."""
    options = StageOptions(progress=False, launch=True, token=hub_token(cfg) if stage == "export" else None)
    result = run_stage(stage, cfg, results, options)
    if stage in PUBLISH:
        PUBLISH[stage](result)
    return result


def _run_name() -> str:
    """'<model> on <dataset>, steps 1-10': what the run trains (the stages it runs are its task runs)."""
    try:
        cfg = validate_config(flow_run.parameters.get("config") or {})
    except ConfigError:
        return "invalid config"  # the flow fails at once and says why
    name = f"{_short(cfg.model.name_or_path)} on {_short(cfg.data.source)}"
    if "train" in cfg.orchestration.stages or "export" in cfg.orchestration.stages:
        grpo = cfg.grpo
        name += f", steps 1-{grpo.max_steps}" if grpo.max_steps is not None else f", {grpo.num_train_epochs:g} epochs"
    return name


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


@flow(name="grpoflow-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the stages listed in orchestration.stages, in DAG order."""
    keep_graceful_stop()  # `grpoflow run` asked for it: SIGTERM ends the GRPO step with a checkpoint
    logger = get_run_logger()
    cfg = validate_config(config or {}, "the flow's config parameter")
    options = retry_options(cfg.orchestration)
    wanted = stages_to_run(cfg.orchestration.stages)
    added = [s for s in wanted if s not in cfg.orchestration.stages]
    if added:
        logger.info("stages %s read the output of %s: running those too", cfg.orchestration.stages, added)
    results = Results()
    for stage in wanted:
        # a task gets a copy of its inputs: the flow keeps what each one returns
        setattr(results, stage, stage_task.with_options(name=TASK_NAMES[stage], **options)(stage, cfg, results))
    figures = results.as_json()
    create_markdown_artifact(key="pipeline-summary", markdown=_summary(figures),
                             description="what this pipeline run did")
    return figures


def _summary(figures: dict[str, Any]) -> str:
    lines = ["| stage | result |", "|---|---|"]
    lines += [f"| {stage} | {summary_line(stage, result)} |" for stage, result in figures.items()]
    return "\n".join(lines)
