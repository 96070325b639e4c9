"""The DAG declared once (stages/dag.py): each stage alone runs what it needs, transitively, and
gives a typed result that prints as JSON and reads back."""

import json
from pathlib import Path

import pytest

from grpoflow.config import ALL_STAGES, validate_config
from stages.dag import NEEDS, Results, StageOptions, run_stage, stages_to_run, summary_line


def tiny_config(tmp_path: Path, tiny_model: Path):
    source = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"question\": \"no answer\"}\n")
    return validate_config({
        "data": {"source": str(source), "output_dir": str(tmp_path / "data")},
        "model": {"name_or_path": str(tiny_model), "finetune": "lora", "dtype": "float32",
                  "lora": {"target_modules": ["q_proj", "v_proj"]}},
        "grpo": {"max_steps": 1, "num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 6,
                 "gradient_checkpointing": False, "warmup": {"enabled": False}, "output_dir": str(tmp_path / "train")},
        "eval": {"max_samples": 2, "max_new_tokens": 6, "output_dir": str(tmp_path / "eval")},
        "export": {"quantizations": [], "output_dir": str(tmp_path / "export")},
    })


def test_the_closure_of_each_stage_is_transitive_and_in_dag_order():
    assert stages_to_run(["prepare"]) == ["prepare"]
    assert stages_to_run(["model"]) == ["model"]
    assert stages_to_run(["train"]) == ["prepare", "model", "train"]
    assert stages_to_run(["evaluate"]) == ["prepare", "model", "evaluate"]
    assert stages_to_run(["export"]) == ["prepare", "model", "train", "export"]  # export -> train -> prepare, model
    assert stages_to_run(["export", "evaluate"]) == ["prepare", "model", "train", "evaluate", "export"]
    assert set(NEEDS) == set(ALL_STAGES)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['deploy'\]"):
        stages_to_run(["deploy"])


def test_a_stage_whose_need_did_not_run_says_which(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    with pytest.raises(RuntimeError, match="the export stage needs the train stage's result, and it did not run"):
        run_stage("export", cfg, Results())
    with pytest.raises(RuntimeError, match="the train stage needs the prepare stage's result"):
        run_stage("train", cfg, Results())


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_each_stage_alone_gives_a_typed_result_that_prints_as_json(stage, tmp_path_factory, tiny_model):
    from grpoflow.base_model import ResolvedModel
    from stages.evaluate import EvalReport
    from stages.export import ExportReport
    from stages.prepare import Manifest
    from stages.train import TrainResult

    types = {"prepare": Manifest, "model": ResolvedModel, "train": TrainResult, "evaluate": EvalReport,
             "export": ExportReport}
    tmp_path = tmp_path_factory.mktemp("dag")  # one folder per stage: each runs its own closure from nothing
    cfg = tiny_config(tmp_path, tiny_model)
    results = Results()
    for s in stages_to_run([stage]):
        run_stage(s, cfg, results, StageOptions(progress=False))
    ran = {s for s in ALL_STAGES if getattr(results, s) is not None}
    assert ran == set(stages_to_run([stage]))
    result = getattr(results, stage)
    assert isinstance(result, types[stage])
    printed = json.loads(json.dumps(results.as_json()))
    assert list(printed) == stages_to_run([stage])
    line = summary_line(stage, printed[stage])
    expected = {"prepare": "36 train / 4 held-out rows, 1 rejected", "model": str(tiny_model),
                "train": "1 GRPO steps", "evaluate": "base: accuracy", "export": "f16 passed"}
    assert expected[stage] in line
    if stage == "train":
        assert TrainResult.from_json(printed["train"]) == result
        assert Path(printed["train"]["model"], "adapter_model.safetensors").is_file()
