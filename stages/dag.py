"""The pipeline's DAG, declared once: which stage reads which, and what flows between them.

    prepare (data) ─┐
    model (base)  ──┴─> train ─> evaluate ─> export

`grpoflow run` and the pipeline flow (flows/pipeline.py) run `stages_to_run` through `run_stage`,
the CLI's one-stage commands and the continuous flow's rounds (flows/continuous.py) call `run_stage`
with the inputs they have. A stage reads the typed results of the stages before it from `Results`
and adds its own; each result says once what it prints as JSON (`as_json()`) and how it reads in a
run's summary (`summary_line`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpoflow.config import ALL_STAGES, PipelineConfig

if TYPE_CHECKING:
    from grpoflow.base_model import ResolvedModel
    from stages.evaluate import EvalReport
    from stages.export import ExportReport
    from stages.prepare import Manifest
    from stages.train import TrainResult

# What a stage cannot run without; those stages run first (each is content-hash cached, so cheap
# when done). evaluate also scores train's model when train runs, and export puts evaluate's
# figures in the model card when evaluate runs: inputs they take when there, not needs.
NEEDS: dict[str, tuple[str, ...]] = {"prepare": (), "model": (), "train": ("prepare", "model"),
                                     "evaluate": ("prepare", "model"), "export": ("train",)}


def stages_to_run(requested: list[str]) -> list[str]:
    """The requested stages and everything they need, transitively, in DAG order."""
    unknown = [s for s in requested if s not in NEEDS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(ALL_STAGES)}")
    wanted, todo = set(), list(requested)
    while todo:
        stage = todo.pop()
        if stage not in wanted:
            wanted.add(stage)
            todo.extend(NEEDS[stage])
    return [s for s in ALL_STAGES if s in wanted]


@dataclass
class PreparedRows:
    """Rows prepared elsewhere (a continuous round's), standing in for the prepare stage's Manifest."""
    train_path: Path | None
    heldout_path: Path


@dataclass
class Results:
    """What the stages of one run gave, typed; None for a stage that did not run."""
    prepare: Manifest | PreparedRows | None = None
    model: ResolvedModel | None = None
    train: TrainResult | None = None
    evaluate: EvalReport | None = None
    export: ExportReport | None = None

    def need(self, stage: str, by: str) -> Any:
        result = getattr(self, stage)
        if result is None:
            raise RuntimeError(f"the {by} stage needs the {stage} stage's result, and it did not run "
                               f"(run_stage the stages of stages_to_run([{by!r}]) in order)")
        return result

    def as_json(self) -> dict[str, Any]:
        return {f.name: r.as_json() for f in fields(self) if (r := getattr(self, f.name)) is not None}


@dataclass
class StageOptions:
    """What a caller adds to the config: how it runs a stage rather than what the stage computes."""
    progress: bool = True  # progress bars (the flows log instead)
    launch: bool = False  # train: start orchestration.train_processes processes with torchrun (the flow does)
    stop_after_s: float | None = None  # train: checkpoint and return after this long (grpoflow train --stop-after)
    models: dict[str, str] = field(default_factory=dict)  # evaluate: label -> model; default base (+ trained)
    token: str | None = None  # export: the Hub token for the push


def run_stage(stage: str, cfg: PipelineConfig, results: Results, options: StageOptions | None = None) -> Any:
    """Run one stage on the results of the stages before it; its result goes into `results` too."""
    from grpoflow.verifiers.sandbox import unsandboxed_allowed

    options = options or StageOptions()
    # The code verifier runs inside rewards, which get no config: its one setting is the process's
    # while the stage runs (and only then: a later stage or flow run with another config is not affected)
    with unsandboxed_allowed(cfg.verifier.allow_unsandboxed):
        result = _RUNNERS[stage](cfg, results, options)
    setattr(results, stage, result)
    return result


def _prepare(cfg: PipelineConfig, results: Results, options: StageOptions) -> Manifest:
    from stages.prepare import run_prepare

    return run_prepare(cfg.data)


def _model(cfg: PipelineConfig, results: Results, options: StageOptions) -> ResolvedModel:
    from grpoflow.base_model import resolve_model

    return resolve_model(cfg.model)


def _train(cfg: PipelineConfig, results: Results, options: StageOptions) -> TrainResult:
    from stages.train import TrainResult, run_train

    data, base = results.need("prepare", "train"), results.need("model", "train")
    if options.launch and cfg.orchestration.train_processes > 1:  # torchrun here: one process per GPU
        from grpoflow.launch import launch_train

        return TrainResult.from_json(launch_train(cfg, cfg.orchestration.train_processes))
    return run_train(cfg, Path(data.train_path), Path(data.heldout_path), base.path, progress=options.progress,
                     stop_after_s=options.stop_after_s)


def _evaluate(cfg: PipelineConfig, results: Results, options: StageOptions) -> EvalReport:
    from stages.evaluate import run_evaluate

    data = results.need("prepare", "evaluate")
    models = options.models
    if not models:
        models = {"base": results.need("model", "evaluate").path}
        if results.train is not None and results.train.finished:
            models["trained"] = results.train.model_dir
    return run_evaluate(cfg.eval, Path(data.heldout_path), models, rollout=cfg.rollout,
                        answer_type=cfg.data.answer_type)


def _export(cfg: PipelineConfig, results: Results, options: StageOptions) -> ExportReport:
    from stages.export import run_export

    trained = results.need("train", "export")
    evaluation = results.evaluate.models if results.evaluate is not None else None
    return run_export(cfg, Path(trained.model_dir), evaluation=evaluation, token=options.token)


_RUNNERS = {"prepare": _prepare, "model": _model, "train": _train, "evaluate": _evaluate, "export": _export}


def summary_line(stage: str, result: dict[str, Any]) -> str:
    """One line of a run's summary table, from the stage's result as JSON."""
    from grpoflow.train.log import describe_reward

    r = result
    if stage == "prepare":
        return (f"{r['rows']['train']:,} train / {r['rows']['heldout']:,} held-out rows, "
                f"{r['rejected']['total']} rejected{' (cached)' if r['cached'] else ''} -> `{r['output_dir']}`")
    if stage == "model":
        return f"{r['description']} -> `{r['path']}`"
    if stage == "train":
        if "reward_first" not in r and "reward_first_10" not in r:  # stopped early (--stop-after): no report yet
            return f"{r['steps']} GRPO steps, stopped -> `{r.get('checkpoint')}`"
        return f"{r['steps']} GRPO steps, reward {describe_reward(r)} -> `{r['model'] or r.get('checkpoint')}`"
    if stage == "evaluate":
        return "; ".join(f"{label}: accuracy {100 * f['accuracy']:.1f}%, last number "
                         f"{100 * f['accuracy_last_number']:.1f}%, strict format {100 * f['format_strict']:.1f}% "
                         f"on {f['scored']}" for label, f in r["models"].items())
    return (", ".join(f"{method} {status}" for method, status in r["gguf"].items()) + f"; {r['warnings']} warning(s)"
            + (f"; pushed to {r['push']['repo_url']}" if r["push"] else "") + f" -> `{r['output_dir']}`")


