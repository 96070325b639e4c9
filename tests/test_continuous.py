"""The continuous fine-tuning flow on a real (temporary) Prefect server, a tiny random model and real files.

Three drops, the second a copy of the first: two rounds, one gate decision each, no row in two
rounds; and the same drops with the flow stopped twice in the middle (inside round 2's GRPO steps,
then after its gate) end where the uninterrupted run ends.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from safetensors.torch import load_file

from flows.continuous import continuous
from grpoflow.config import ConfigError, validate_config
from grpoflow.rounds import Rounds
from stages import continuous as continuous_stage
from stages import export as export_stage
from stages import train as train_stage
from stages.continuous import gate
from tests.drops import rows


class Stop(BaseException):
    """A stop from outside (a killed worker, Ctrl-C): not an error any retry would catch."""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)  # a drop is written aside, then renamed in
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(path)
    return path


def make_config(root: Path, model: Path) -> dict:
    return {"data": {"answer_format": "gsm8k"},
            "model": {"name_or_path": str(model), "finetune": "lora", "dtype": "float32",
                      "lora": {"target_modules": ["q_proj", "v_proj"]}},
            "grpo": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 16, "learning_rate": 1e-2,
                     "max_completion_length": 8, "gradient_checkpointing": False, "save_steps": 1,
                     "warmup": {"enabled": False}},
            "eval": {"max_samples": 3, "max_new_tokens": 8},
            "export": {"quantizations": []},
            "orchestration": {"retries": 1, "retry_delay_seconds": 0},
            "continuous": {"drop_dir": str(root / "drops"), "heldout": str(write_jsonl(root / "heldout.jsonl",
                                                                                        rows(range(500, 504)))),
                           "min_new_rows": 6, "state_dir": str(root / "state"),
                           "settle_seconds": 0}}


DROPS = {"drop-1.jsonl": rows(range(8)), "drop-2.jsonl": rows(range(8)), "drop-3.jsonl": rows(range(100, 108))}


def task_runs(parent_flow_run_id) -> tuple[dict[str, list], list[str]]:
    """The task runs of a flow run's subflows, by task name, and the subflows' names."""
    async def read():
        async with get_client() as client:
            subflows = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])))
            return subflows, await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[run.id for run in subflows])))

    subflows, runs = asyncio.run(read())
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return found, [s.name for s in subflows]


def adapters(state: Path, round_number: int) -> dict[str, torch.Tensor]:
    (r,) = [r for r in Rounds(state).all() if r.round == round_number]
    return load_file(Path(r.training["model"]) / "adapter_model.safetensors")


def summary(state: Path) -> list[dict]:
    """What a run decided, without the paths and times that differ between two state folders."""
    return [{"round": r.round, "rows": r.rows, "steps": r.steps, "status": r.status, "from": r.champion.round,
             "promoted": r.decision["promoted"], "metric": r.decision["metric"],
             "values": (r.decision["champion"], r.decision["challenger"]), "exported": r.export is not None}
            for r in Rounds(state).all()]


def test_three_drops_two_rounds_and_a_restart_changes_nothing(prefect_server, tiny_model, tmp_path, monkeypatch):
    # uninterrupted
    a = tmp_path / "a"
    config = make_config(a, tiny_model)
    results = []
    for name, records in DROPS.items():
        write_jsonl(a / "drops" / name, records)
        results.append(continuous(config=config))
    assert [len(r["rounds"]) for r in results] == [1, 0, 1]  # the copy of drop 1 brings no new row
    assert results[1]["waiting"]["new_rows"] == 0 and results[1]["waiting"]["prepared_rows"] == 8
    expected = summary(a / "state")
    assert [(s["round"], s["rows"], s["steps"], s["from"], s["status"]) for s in expected] == [
        (1, 8, (1, 2), 0, "done"), (2, 8, (3, 4), 1, "done")]
    assert all(s["promoted"] and s["exported"] for s in expected)  # a random model scores 0 both times: no regression
    assert len(list((a / "state" / "train").iterdir())) == 2  # two trainings, nothing more

    ledger = pq.read_table(a / "state" / "ledger.parquet").to_pylist()
    assert len(ledger) == 16 and len({r["id"] for r in ledger}) == 16  # no row in two rounds
    assert {r["round"] for r in ledger if "drop-1" in r["origin"]} == {1}
    assert {r["round"] for r in ledger if "drop-3" in r["origin"]} == {2}
    assert not any("drop-2" in r["origin"] for r in ledger)
    history = json.loads((a / "state" / "history.json").read_text())
    assert [h["decision"]["promoted"] for h in history] == [True, True]
    assert history[1]["champion"]["model"] == history[0]["promoted_model"]  # round 2 starts from round 1's champion
    assert results[2]["champion"]["round"] == 2 and results[2]["champion"]["steps"] == 4

    # the same drops, stopped inside round 2's GRPO steps, then after its gate decision
    b = tmp_path / "b"
    config = make_config(b, tiny_model)
    real_loss, real_export = train_stage.micro_step_loss, export_stage.run_export
    for name, records in list(DROPS.items())[:2]:
        write_jsonl(b / "drops" / name, records)
        continuous(config=config)
    write_jsonl(b / "drops" / "drop-3.jsonl", DROPS["drop-3.jsonl"])
    calls = {"loss": 0}

    def stop_on_second_step(*args, **kwargs):
        calls["loss"] += 1
        if calls["loss"] == 2:
            raise Stop("stopped inside GRPO step 2 of round 2")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_stage, "micro_step_loss", stop_on_second_step)
    with pytest.raises(Stop):
        continuous(config=config)
    (open_round,) = [r for r in Rounds(b / "state").all() if r.round == 2]
    assert open_round.status == "open" and open_round.decision is None
    assert list((Path(b / "state" / "train").glob("*/checkpoints/step-000001")))  # what the restart resumes from

    monkeypatch.setattr(train_stage, "micro_step_loss", real_loss)

    def stop_in_export(*args, **kwargs):
        raise Stop("stopped in the export of round 2")

    monkeypatch.setattr(export_stage, "run_export", stop_in_export)
    with pytest.raises(Stop):
        continuous(config=config)
    decided = Rounds(b / "state").unfinished()
    assert decided.round == 2 and decided.status == "decided"

    monkeypatch.setattr(export_stage, "run_export", real_export)
    state = continuous(config=config, return_state=True)
    final = state.result()
    assert [r["round"] for r in final["rounds"]] == [2]
    assert final["rounds"][0]["decision"] == decided.decision  # taken once, read back after the restart
    runs, names = task_runs(state.state_details.flow_run_id)
    assert names == [f"round 2: {tiny_model.name} (champion of round 1) + 8 rows, steps 3-4"]
    assert [r.state.name for r in runs["train-round"]] == ["Cached"]  # finished before the stop: not run again
    assert [r.state.name for r in runs["evaluate-round"]] == ["Cached"]

    assert summary(b / "state") == expected
    assert len(list((b / "state" / "train").iterdir())) == 2
    assert pq.read_table(b / "state" / "ledger.parquet").column("id").to_pylist() == [r["id"] for r in ledger]
    for n in (1, 2):  # the stopped and resumed GRPO run ends on the same weights
        wa, wb = adapters(a / "state", n), adapters(b / "state", n)
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_gate_promotes_within_the_tolerance_only():
    assert gate({"accuracy": 0.50}, {"accuracy": 0.49}, "accuracy", 0.02).promoted
    assert gate({"accuracy": 0.50}, {"accuracy": 0.48}, "accuracy", 0.02).promoted  # exactly the tolerance
    kept = gate({"accuracy": 0.50}, {"accuracy": 0.40}, "accuracy", 0.02)
    assert not kept.promoted and kept.delta == pytest.approx(-0.10)
    assert kept.describe().startswith("kept the champion: accuracy 0.4000 (challenger) vs 0.5000")


def test_missing_heldout_or_drop_folder_is_named(prefect_server, tmp_path):
    cfg = validate_config({"continuous": {"drop_dir": str(tmp_path / "drops")}})
    with pytest.raises(ConfigError, match="continuous.heldout: not set"):
        continuous_stage.check(cfg)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", rows(range(3)))
    cfg = validate_config({"continuous": {"drop_dir": str(tmp_path / "drops"), "heldout": str(heldout)}})
    with pytest.raises(ConfigError, match=r"continuous.drop_dir: .*drops is not a folder; create it"):
        continuous_stage.check(cfg)
