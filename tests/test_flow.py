"""The pipeline flow on a real (temporary) Prefect server."""

import asyncio
import json
import re
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows.pipeline import pipeline


def small_source(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    rows.append({"question": "broken"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def artifacts_of(flow_run_id) -> dict:
    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return {a.key: a for a in found}

    return asyncio.run(read())


def flow_run_named(flow_run_id):
    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return runs[0]

    return asyncio.run(read())


def task_logs(flow_run_id) -> dict[str, list[str]]:
    """The flow run's log messages by task run name, as the UI's task logs show them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    async def read():
        await APILogHandler.aflush()  # the records still queued for the API
        async with get_client() as client:
            tasks = await client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
            names = {t.id: t.name for t in tasks}
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found: dict[str, list[str]] = {}
            for record in logs:
                found.setdefault(names.get(record.task_run_id, "flow"), []).append(record.message)
            return found

    return asyncio.run(read())


def test_the_whole_dag_on_a_tiny_model(prefect_server, tmp_path, tiny_model, monkeypatch):
    from huggingface_hub import constants
    from prefect.blocks.system import Secret

    from tests.hub_server import FakeHub

    # the export pushes to a fake Hub on 127.0.0.1 with the token from a Prefect Secret block
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token = "hf_FLOWsecretBlockToken0123456789abcdef"
    Secret(value=token).save("hf-token-for-tests", overwrite=True)
    hub = FakeHub(token=token).start()
    config = {"data": {"source": str(small_source(tmp_path)), "output_dir": str(tmp_path / "data")},
              "model": {"name_or_path": str(tiny_model), "finetune": "lora", "dtype": "float32",
                        "lora": {"target_modules": ["q_proj", "v_proj"]}},
              "grpo": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 4,
                       "max_completion_length": 8, "gradient_checkpointing": False, "log_completions_steps": 1,
                       "warmup": {"rows": 4, "batch_size": 4, "eval_prompts": 2},
                       "output_dir": str(tmp_path / "train")},
              "eval": {"max_samples": 3, "max_new_tokens": 8, "output_dir": str(tmp_path / "eval")},
              "export": {"quantizations": ["q8_0"], "output_dir": str(tmp_path / "export"), "push_to_hub": True,
                         "hub_repo_id": "alice/tiny", "hub_endpoint": hub.url,
                         "hub_token_secret": "hf-token-for-tests"},
              "orchestration": {"stages": ["evaluate", "train", "export"]}}
    try:
        state = pipeline(config=config, return_state=True)
        results = state.result()
    finally:
        hub.stop()
    assert results["prepare"]["rows"] == {"train": 36, "heldout": 4}  # run because train and evaluate need it
    assert results["prepare"]["rejected"]["total"] == 1
    assert results["train"]["steps"] == 2 and Path(results["train"]["model"], "adapter_model.safetensors").is_file()
    assert set(results["evaluate"]["models"]) == {"base", "trained"}  # side by side
    assert results["export"]["gguf"] == {"f16": "passed", "q8_0": "passed"}
    assert results["export"]["push"]["repo_id"] == "alice/tiny"
    assert {"model.safetensors", "gguf/tiny-q8_0.gguf", "adapters/adapter_model.safetensors",
            "README.md"} <= set(hub.repos["alice/tiny"].files)

    # progress reaches the task logs (no bar draws here): a line per GRPO step, warm-up, evaluation, export
    logs = {name.split("-")[0]: lines for name, lines in task_logs(state.state_details.flow_run_id).items()}
    steps = [line for line in logs["train"] if re.match(r"step \d of 2: reward", line)]
    assert [line[:9] for line in steps] == ["step 1 of", "step 2 of"], logs["train"]
    assert any(line.startswith("format warm-up: epoch 1 of") for line in logs["train"]), logs["train"]
    assert any(re.match(r"generating \(hf\): 3 of 3 prompts done", line) for line in logs["evaluate"]), logs
    assert any(re.match(r"gguf/tiny-q8_0\.gguf: .* verified", line) for line in logs["export"]), logs["export"]

    run = flow_run_named(state.state_details.flow_run_id)
    assert run.name == f"{tiny_model.name} on train.jsonl, steps 1-2"
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert {"data-manifest", "data-rejects", "training", "training-curve", "training-curves", "sampled-completions",
            "evaluation", "export", "pipeline-summary"} <= set(artifacts)
    assert artifacts["training-curves"].data.startswith("![reward and loss per step](data:image/png;base64,iVBOR")
    completions = json.loads(artifacts["sampled-completions"].data)
    assert len(completions) == 4 and {"prompt", "completion", "reward", "advantage"} <= set(completions[0])
    summary = artifacts["pipeline-summary"].data
    assert "| export | f16 passed, q8_0 passed; 0 warning(s); pushed to" in summary
    assert "| `gguf/tiny-q8_0.gguf` | passed |" in artifacts["export"].data
    assert all(token not in (a.data or "") for a in artifacts.values())
    assert "36 train / 4 held-out rows, 1 rejected" in summary and "| train | 2 GRPO steps" in summary
    assert "| metric | base | trained |" in artifacts["evaluation"].data
    assert {"reason": "missing_answer", "rows": 1}.items() <= json.loads(artifacts["data-rejects"].data)[0].items()

    config["export"]["push_to_hub"] = False
    again = pipeline(config=config)  # every stage is keyed by its inputs: nothing is redone
    assert again["prepare"]["cached"] is True
    assert again["train"]["model"] == results["train"]["model"]


def test_a_user_error_fails_the_flow_without_retrying(prefect_server, tmp_path):
    config = {"data": {"source": str(tmp_path / "missing.jsonl"), "output_dir": str(tmp_path / "data")},
              "orchestration": {"stages": ["prepare"], "retries": 2, "retry_delay_seconds": 0}}
    state = pipeline(config=config, return_state=True)
    assert state.is_failed()

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    (run,) = asyncio.run(task_runs())
    assert run.name.startswith("prepare-data") and run.run_count == 1
    with pytest.raises(Exception, match="does not exist"):
        state.result()


def test_a_bad_config_fails_before_any_stage(prefect_server):
    state = pipeline(config={"grpo": {"loss_type": "ppo"}}, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="grpo.loss_type: 'ppo' is not allowed"):
        state.result()


@pytest.mark.slow
def test_pipeline_prepares_gsm8k_and_the_model(prefect_server, tmp_path, model_cache):
    config = {"data": {"output_dir": str(tmp_path / "data")}, "model": {"cache_dir": str(model_cache)},
              "orchestration": {"stages": ["prepare", "model"]}}
    results = pipeline(config=config)
    assert results["prepare"]["rows"] == {"train": 7473, "heldout": 1319}
    assert Path(results["model"]["path"], "config.json").is_file()


def test_export_alone_through_the_flow(prefect_server, tmp_path, tiny_model):
    """`grpoflow run --stages export` once ended in KeyError: 'prepare' (the closure went one level deep)."""
    config = {"data": {"source": str(small_source(tmp_path)), "output_dir": str(tmp_path / "data")},
              "model": {"name_or_path": str(tiny_model), "finetune": "lora", "dtype": "float32",
                        "lora": {"target_modules": ["q_proj", "v_proj"]}},
              "grpo": {"max_steps": 1, "num_generations": 4, "per_device_train_batch_size": 4,
                       "max_completion_length": 8, "gradient_checkpointing": False, "warmup": {"enabled": False},
                       "output_dir": str(tmp_path / "train")},
              "export": {"quantizations": ["q8_0"], "output_dir": str(tmp_path / "export")},
              "orchestration": {"stages": ["export"]}}
    results = pipeline(config=config)
    assert list(results) == ["prepare", "model", "train", "export"]
    assert results["train"]["steps"] == 1 and results["export"]["gguf"] == {"f16": "passed", "q8_0": "passed"}


def test_the_continuous_flow_pushes_with_the_token_of_the_secret_block(prefect_server, tmp_path, monkeypatch):
    """flows/continuous.py's export once left export.hub_token_secret unread (and pushed with HF_TOKEN)."""
    from prefect.blocks.system import Secret

    from flows import continuous
    from grpoflow.config import validate_config
    from stages import export as export_stage
    from stages.evaluate import EvalReport
    from stages.export import ExportReport
    from stages.train import TrainResult

    token = "hf_CONTINUOUSsecretBlockToken0123456789"
    Secret(value=token).save("hf-token-continuous", overwrite=True)
    seen = {}

    def fake_export(cfg, model_dir, *, evaluation=None, token=None):
        seen["token"], seen["model_dir"], seen["evaluation"] = token, model_dir, evaluation
        return ExportReport(str(tmp_path), {"gguf": [], "push": None, "warnings": []}, "")

    monkeypatch.setattr(export_stage, "run_export", fake_export)
    monkeypatch.setattr(continuous, "publish_export", lambda *a: None)
    cfg = validate_config({"export": {"push_to_hub": True, "hub_repo_id": "alice/x",
                                      "hub_token_secret": "hf-token-continuous"}})
    trained = TrainResult(str(tmp_path), str(tmp_path / "final"), 2, {"steps": 2})
    evaluation = EvalReport(str(tmp_path), {"challenger": {"accuracy": 0.5}}, "")
    continuous.export.fn(cfg, trained, evaluation)
    assert seen == {"token": token, "model_dir": tmp_path / "final", "evaluation": evaluation.models}
