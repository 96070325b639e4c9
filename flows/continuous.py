"""Continuous fine-tuning as Prefect flows: drops arrive, rounds train, a gate decides, champions export.

    grpoflow-continuous (one look at the drops)
        finish the round a stop interrupted, if any
        intake: drops + held-out -> data prep -> rows no round has; >= continuous.min_new_rows opens a round
        grpoflow-round (a subflow per round, named "round 2: <model> (champion of round 1) + 40 rows, steps 11-20")
            train-round     GRPO from the champion's weights on the round's rows (resumes its own checkpoint)
            evaluate-round  champion vs challenger on the fixed held-out set
            gate            promote unless continuous.gate_metric regresses beyond continuous.tolerance
            promote         the challenger as the model the next round starts from
            export          the new champion's files

A stop anywhere loses nothing and repeats nothing: the round's rows are consumed when its folder
appears (grpoflow/rounds.py), its decision is taken once and written down, and the task results are
cached in the state folder under keys made of what they read (grpoflow/hashing.py), so a restart skips
every finished task and the interrupted one resumes from what it wrote. `make serve` runs this every
continuous.poll_seconds, one run at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

import flows  # noqa: F401  (offline Prefect defaults, before prefect is imported)
from flows.monitoring import publish_evaluation, publish_export, publish_manifest, publish_training
from flows.retry import retry_options, retry_unless_user_error
from flows.secrets import hub_token
from grpoflow.atomic import remove_stale_under, write_atomic
from grpoflow.base_model import ResolvedModel
from grpoflow.clock import now_iso
from grpoflow.config import PipelineConfig, validate_config
from grpoflow.hashing import cache_key, file_sha256, model_fingerprint
from flows.abandoned import claim_state_dir
from grpoflow.reaper import watch_children
from grpoflow.rounds import Rounds, load_round
from grpoflow.stopping import check_stop, keep_graceful_stop
from stages.continuous import check, gate, intake, lineage_model, stage_config
from stages.continuous_status import INTAKE
from stages.dag import PreparedRows, Results, StageOptions, run_stage
from stages.evaluate import EvalReport
from stages.export import ExportReport
from stages.train import TRAINED_IDS, TrainResult

# -- cache keys: content hashes of the data a task reads, fingerprints of its models ---------------


def _train_key(context: Any, inputs: dict[str, Any]) -> str:
    cfg: PipelineConfig = inputs["cfg"]
    return "train-round-" + cache_key([file_sha256(Path(inputs["train_path"])),
                                       model_fingerprint(inputs["champion_model"]),
                                       cfg.model.model_dump(mode="json"), cfg.grpo.model_dump(mode="json")])


def _evaluate_key(context: Any, inputs: dict[str, Any]) -> str:
    cfg: PipelineConfig = inputs["cfg"]
    return "evaluate-round-" + cache_key([file_sha256(Path(inputs["heldout"])),
                                          {k: model_fingerprint(v) for k, v in inputs["models"].items()},
                                          cfg.eval.model_dump(mode="json"), cfg.rollout.model_dump(mode="json")])


def _export_key(context: Any, inputs: dict[str, Any]) -> str:
    cfg: PipelineConfig = inputs["cfg"]
    return "export-" + cache_key([model_fingerprint(inputs["trained"].model_dir), cfg.export.model_dump(mode="json")])


def _cached(cfg: PipelineConfig, key_fn) -> dict[str, Any]:
    """Task options: retries with backoff, the result kept in the state folder under `key_fn`'s key.
    The cache lives beside the files its results name: delete the folder and both are gone."""
    return {**retry_options(cfg.orchestration), "cache_key_fn": key_fn, "persist_result": True,
            "result_storage": Path(cfg.continuous.state_dir).resolve() / "prefect-results"}


# -- tasks: each calls a stage and publishes what it did -------------------------------------------


@task(name="base-model", retry_condition_fn=retry_unless_user_error)
def base_model(cfg: PipelineConfig) -> str:
    return run_stage("model", cfg, Results()).path


@task(name="intake", retry_condition_fn=retry_unless_user_error)
def intake_drops(cfg: PipelineConfig, base: str) -> dict[str, Any]:
    """Rows no round has trained on; a new round over all of them once there are enough."""
    logger = get_run_logger()
    rounds = Rounds(cfg.continuous.state_dir)
    found = intake(cfg, rounds)
    if found.manifest is not None:
        publish_manifest(found.manifest, key_prefix="intake")
    n, needed = found.waiting_rows, cfg.continuous.min_new_rows
    status = {"drops": found.drops, "prepared_rows": found.manifest.splits["train"]["rows"] if found.manifest else 0,
              "new_rows": n,
              "min_new_rows": needed, "round": None, "quarantined": found.scan.quarantined,
              "waiting_files": found.scan.waiting, "ignored_files": found.scan.ignored}
    if n >= needed:
        r = rounds.open(found.new_rows, found.heldout_path, rounds.champion(base), cfg.grpo.max_steps, found.row_id)
        logger.info("round %d opened: %d of %d new rows from %d drop(s), steps %d-%d from champion round %d", r.round,
                    r.rows, n, len(found.drops), *r.steps, r.champion.round)
        status["round"] = r.folder
    else:
        logger.info("%d new row(s), a round needs %d: waiting for more drops", n, needed)
    write_atomic(Path(cfg.continuous.state_dir) / INTAKE, json.dumps(
        {**status, "at": now_iso(), "rejects": str(found.manifest.rejects_path) if found.manifest else None},
        indent=2) + "\n")
    return status


@task(name="train-round", retry_condition_fn=retry_unless_user_error)
def train_round(cfg: PipelineConfig, train_path: str, heldout_path: str, champion_model: str,
                first_step: int) -> TrainResult:
    inputs = Results(prepare=PreparedRows(Path(train_path), Path(heldout_path)),
                     model=ResolvedModel(champion_model, "the champion"))
    result = run_stage("train", cfg, inputs, StageOptions(progress=False, launch=True))
    publish_training(result.output_dir, result.report, first_step=first_step)
    return result


@task(name="evaluate-round", retry_condition_fn=retry_unless_user_error)
def evaluate_round(cfg: PipelineConfig, heldout: str, models: dict[str, str]) -> EvalReport:
    inputs = Results(prepare=PreparedRows(None, Path(heldout)))
    report = run_stage("evaluate", cfg, inputs, StageOptions(progress=False, models=models))
    publish_evaluation(report.markdown, report.output_dir, title="champion vs challenger on the held-out set")
    return report


@task(name="gate")
def decide(cfg: PipelineConfig, round_dir: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The round's decision, taken once: a restart reads the one written down."""
    rounds = Rounds(cfg.continuous.state_dir)
    r = load_round(Path(round_dir))
    if r.decision is None:
        cc = cfg.continuous
        decision = gate(figures["champion"], figures["challenger"], cc.gate_metric, cc.tolerance)
        r.decision = {**asdict(decision), "text": decision.describe()}
        r.status = "decided"
        rounds.save(r)
    get_run_logger().info("round %d: %s", r.round, r.decision["text"])
    create_table_artifact(key="gate", table=[{"round": r.round, "champion": f"round {r.champion.round}",
                                              "metric": r.decision["metric"], "champion_value": r.decision["champion"],
                                              "challenger_value": r.decision["challenger"],
                                              "delta": r.decision["delta"], "tolerance": r.decision["tolerance"],
                                              "promoted": r.decision["promoted"]}],
                          description=r.decision["text"])
    return r.decision


@task(name="promote", retry_condition_fn=retry_unless_user_error)
def promote(final_dir: str, out: str) -> str:
    return str(lineage_model(Path(final_dir), Path(out)))


@task(name="export", retry_condition_fn=retry_unless_user_error)
def export(cfg: PipelineConfig, trained: TrainResult, evaluation: EvalReport) -> ExportReport:
    """The Hub token is read here, never passed as a parameter."""
    inputs = Results(train=trained, evaluate=evaluation)
    report = run_stage("export", cfg, inputs, StageOptions(progress=False, token=hub_token(cfg)))
    publish_export(report.markdown, report.output_dir)
    return report


def trained_ids(trained: TrainResult) -> list[str] | None:
    path = Path(trained.model_dir) / TRAINED_IDS
    return json.loads(path.read_text()) if path.is_file() else None


# -- flows ----------------------------------------------------------------------------------------


def _round_name() -> str:
    """'round 2: tiny-model (champion of round 1) + 8 rows, steps 3-4'."""
    r = load_round(Path(flow_run.parameters["round_dir"]))
    base = str(flow_run.parameters["config"]["model"]["name_or_path"]).rstrip("/").rsplit("/", 1)[-1]
    start = "base" if r.champion.round == 0 else f"champion of round {r.champion.round}"
    return f"round {r.round}: {base} ({start}) + {r.rows} rows, steps {r.steps[0]}-{r.steps[1]}"


@flow(name="grpoflow-round", flow_run_name=_round_name, log_prints=True)
def training_round(config: dict[str, Any], round_dir: str) -> dict[str, Any]:
    """One round: train the challenger from the champion, judge both, promote and export or keep."""
    keep_graceful_stop()
    cfg = stage_config(validate_config(config, "the flow's config parameter"))
    rounds = Rounds(cfg.continuous.state_dir)
    r = load_round(Path(round_dir))
    trained = train_round.with_options(**_cached(cfg, _train_key))(
        cfg, str(r.train_path), str(r.heldout_path), r.champion.model, r.steps[0])
    if r.training is None:
        rounds.record_training(r, trained.as_json(), trained_ids(trained))
    check_stop(f"after round {r.round}'s training")
    models = {"champion": r.champion.model, "challenger": trained.model_dir}
    evaluation = evaluate_round.with_options(**_cached(cfg, _evaluate_key))(cfg, str(r.heldout_path), models)
    decision = decide(cfg, round_dir, evaluation.models)
    r = load_round(Path(round_dir))  # as the gate wrote it
    if decision["promoted"]:
        out = Path(cfg.continuous.state_dir) / "champions" / f"{r.round:04d}"
        r.promoted_model = promote.with_options(**retry_options(cfg.orchestration))(trained.model_dir, str(out))
        r.export = export.with_options(**_cached(cfg, _export_key))(cfg, trained, evaluation).as_json()
    r.status = "done"
    rounds.save(r)
    return {"round": r.round, "rows": r.rows, "steps": list(r.steps), "decision": r.decision,
            "champion": r.promoted_model if decision["promoted"] else r.champion.model, "export": r.export}


def _watch_name() -> str:
    config = flow_run.parameters.get("config") or {}
    model = (config.get("model") or {}).get("name_or_path", "smollm2-135m-instruct")
    drops = (config.get("continuous") or {}).get("drop_dir", "artifacts/drops")
    return f"continuous: {str(model).rstrip('/').rsplit('/', 1)[-1]} on drops in {drops}"


@flow(name="grpoflow-continuous", flow_run_name=_watch_name, log_prints=True)
def continuous(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finish an interrupted round, then train on the new drops while there are enough new rows."""
    keep_graceful_stop()
    cfg = stage_config(validate_config(config or {}, "the flow's config parameter"))
    check(cfg)
    watch_children()  # what this run starts dies with it, even under kill -9
    claim_state_dir(Path(cfg.continuous.state_dir))
    removed = remove_stale_under(Path(cfg.continuous.state_dir))
    if removed:
        get_run_logger().info("removed %d temporary file(s) left by killed runs: %s", len(removed),
                              ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
    rounds = Rounds(cfg.continuous.state_dir)
    base = base_model.with_options(**retry_options(cfg.orchestration))(cfg)
    done, waiting = [], None
    while True:
        check_stop("between rounds")
        pending = rounds.unfinished()
        if pending is None:
            waiting = intake_drops.with_options(**retry_options(cfg.orchestration))(cfg, base)
            pending = rounds.unfinished()
        if pending is None:
            break
        done.append(training_round(config=cfg.model_dump(mode="json"), round_dir=pending.folder))
    champion = rounds.champion(base)
    create_markdown_artifact(key="continuous-history", markdown=_history(rounds, champion),
                             description=f"every round so far; {cfg.continuous.state_dir}/history.json")
    return {"rounds": done, "waiting": waiting, "champion": asdict(champion)}


def _history(rounds: Rounds, champion) -> str:
    lines = [f"champion: round {champion.round} (`{champion.model}`, {champion.steps} GRPO steps)", "",
             "| round | rows | steps | from | decision | export |", "|---|---|---|---|---|---|"]
    for r in rounds.all():
        decision = r.decision["text"] if r.decision else r.status
        exported = f"`{r.export['output_dir']}`" if r.export else "-"
        lines.append(f"| {r.round} | {r.rows} | {r.steps[0]}-{r.steps[1]} | round {r.champion.round} | {decision} | "
                     f"{exported} |")
    return "\n".join(lines)
