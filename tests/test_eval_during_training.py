"""Evaluation during training (grpo.eval_strategy) and the best checkpoint, on CPU with a tiny
random model; and that the default config's evaluation stage compares two different models."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prefect import flow

from flows.monitoring import publish_training
from grpoflow.config import ConfigError, load_config, validate_config
from grpoflow.evaluation import wilson_interval
from grpoflow.jsonl import read_records
from grpoflow.train.checkpoint import trained_weights
from grpoflow.train.log import is_eval_record
from grpoflow.train.periodic_eval import PeriodicEval
from stages.evaluate import run_evaluate
from stages.train import run_train
from tests.test_flow import artifacts_of
from tests.test_train import config, data


def eval_config(tmp_path: Path, **grpo):
    """test_train's config, evaluating every 2 steps on the 4 held-out rows, scored with the same
    spaces reward the run trains on (so the held-out reward is not zero everywhere)."""
    cfg = config(tmp_path, **{"eval_strategy": "steps", "eval_steps": 2, "eval_prompts": 4, **grpo})
    cfg.eval.reward_funcs = cfg.grpo.reward_funcs
    return cfg


def lines(result) -> tuple[list[dict], list[dict]]:
    records = read_records(Path(result.output_dir) / "metrics.jsonl")
    return [r for r in records if not is_eval_record(r)], [r for r in records if is_eval_record(r)]


def test_eval_every_n_steps_lands_in_metrics_with_intervals_and_changes_nothing_else(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = eval_config(tmp_path / "a", max_steps=5)
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    steps, evals = lines(result)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # where GRPO starts, every eval_steps, and the last step
    for r in evals:
        assert r["eval_scored"] == 4
        for key in ("accuracy", "accuracy_last_number"):
            p = r[f"eval_{key}"]
            assert r[f"eval_{key}_ci95"] == pytest.approx(list(wilson_interval(round(p * 4), 4)))
        assert 0 <= r["eval_format_strict"] <= 1 and r["eval_reward"] == r["eval_rewards/spaces"]
    assert len({r["eval_reward"] for r in evals}) > 1, evals  # the policy moves between evaluations (lr 3e-3)
    report = json.loads((Path(result.model_dir) / "report.json").read_text())
    assert Path(report["eval_plot"]).stat().st_size > 1000 and report["final_model_step"] == 5
    assert report["reward_first"] is not None and report["step_seconds_median"] > 0  # eval lines left out

    # the same run without evaluation: the same steps (the evaluation puts the RNGs back)
    plain = run_train(config(tmp_path / "b", max_steps=5), train, heldout, str(tiny_model), progress=False)
    assert [(r["loss"], r["reward"]) for r in lines(plain)[0]] == [(r["loss"], r["reward"]) for r in steps]

    # the figures at the last step are the evaluation stage's for final/ (same code, same lengths)
    cfg.eval.max_new_tokens, cfg.eval.max_samples, cfg.eval.output_dir = 8, 4, tmp_path / "eval"
    stage = run_evaluate(cfg.eval, heldout, {"trained": result.model_dir}).models["trained"]
    for key in ("accuracy", "format_strict", "format_soft", "reward", "mean_completion_tokens", "truncated"):
        assert evals[-1][f"eval_{key}"] == pytest.approx(stage[key]), key


def metric_by_step(monkeypatch, key: str, values: dict[int, float]):
    """The real evaluation runs; then its `key` figure is `values[step]`, so a tiny random model's best
    checkpoint can be placed on cue. Returns the patched evaluate (to wrap further)."""
    real = PeriodicEval.evaluate

    def evaluate(self, policy, engine, step):
        metrics = real(self, policy, engine, step)
        metrics[key] = self.last[key] = values[step]
        return metrics

    monkeypatch.setattr(PeriodicEval, "evaluate", evaluate)
    return evaluate


def test_best_checkpoint_is_spared_by_pruning_and_loaded_at_the_end(tiny_model, tmp_path, monkeypatch,
                                                                     prefect_server):
    """A metric made to peak at step 2 of 6 (a tiny random model cannot be made to peak on cue: the
    real evaluation runs, its reward is then overwritten): with save_total_limit 1 only step 6 and
    the best are kept, final/ holds step 2's weights, and the Prefect artifacts say so."""
    peaks_at_two = {0: 0.99, 2: 0.9, 4: 0.5, 6: 0.7}  # step 0 has no checkpoint: never the best
    metric_by_step(monkeypatch, "eval_reward", peaks_at_two)
    train, heldout = data(tmp_path)
    cfg = eval_config(tmp_path, max_steps=6, save_steps=2, save_total_limit=1, metric_for_best_model="reward",
                      load_best_model_at_end=True)
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    checkpoints = Path(result.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000006"]
    saved = torch.load(checkpoints / "step-000006" / "trainer_state.pt", weights_only=False)
    assert (saved["best_global_step"], saved["best_metric"]) == (2, 0.9)

    from safetensors.torch import load_file

    final = load_file(Path(result.model_dir) / "model.safetensors")
    best, last = trained_weights(checkpoints / "step-000002"), trained_weights(checkpoints / "step-000006")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)  # the last step's model is another one
    report = json.loads((Path(result.model_dir) / "report.json").read_text())
    assert (report["final_model_step"], report["best_global_step"], report["best_metric"]) == (2, 2, 0.9)
    assert report["best_model_checkpoint"] == str(checkpoints / "step-000002")

    @flow
    def publish():
        publish_training(result.output_dir, report)

    artifacts = artifacts_of(publish(return_state=True).state_details.flow_run_id)
    table = json.loads(artifacts["training-eval"].data)
    assert [(r["step"], r["reward"], r["best"]) for r in table] == [(0, 0.99, ""), (2, 0.9, "best"), (4, 0.5, ""), (6, 0.7, "")]
    assert "final/ is step 2's model" in artifacts["training-eval"].description
    assert artifacts["training-eval-curve"].data.startswith("![held-out figures per evaluation](data:image/png;base64,")
    assert [r["step"] for r in json.loads(artifacts["training-curve"].data)] == [1, 2, 3, 4, 5, 6]


def test_greater_is_better_false_keeps_the_lowest(tiny_model, tmp_path, monkeypatch):
    values = {0: 0.0, 1: 0.5, 2: 0.2, 3: 0.4}
    metric_by_step(monkeypatch, "eval_accuracy", values)
    train, heldout = data(tmp_path)
    cfg = eval_config(tmp_path, max_steps=3, eval_steps=1, save_steps=1, save_total_limit=1,
                      metric_for_best_model="accuracy", greater_is_better=False)
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert sorted(p.name for p in (Path(result.output_dir) / "checkpoints").iterdir()) == ["step-000002",
                                                                                          "step-000003"]
    report = json.loads((Path(result.model_dir) / "report.json").read_text())
    assert (report["best_global_step"], report["final_model_step"]) == (2, 3)  # not loaded: load_best is off


def test_resume_keeps_the_best_so_far(tiny_model, tmp_path, monkeypatch):
    """Stopped after step 2 (the best), resumed: steps 4 and 6 are compared against step 2's figure,
    not against nothing, so step 2 stays the best and is still spared by pruning."""
    values = {0: 0.0, 2: 0.8, 4: 0.3, 6: 0.6}
    evaluate = metric_by_step(monkeypatch, "eval_reward", values)
    train, heldout = data(tmp_path)
    cfg = eval_config(tmp_path, max_steps=6, save_steps=2, save_total_limit=1, metric_for_best_model="reward",
                      load_best_model_at_end=True)
    first = run_train(cfg, train, heldout, str(tiny_model), progress=False, stop_after_s=0)  # stops after step 1
    assert not first.finished and first.steps == 1
    state = torch.load(Path(first.report["checkpoint"]) / "trainer_state.pt", weights_only=False)
    assert state["best_global_step"] is None  # step 1 was not evaluated
    calls = []
    monkeypatch.setattr(PeriodicEval, "evaluate", lambda self, *a: calls.append(a[-1]) or evaluate(self, *a))
    second = run_train(cfg, train, heldout, str(tiny_model), progress=False, stop_after_s=1e-9)
    assert second.steps == 2 and calls == [2]  # resumed at step 2: evaluated, the best, checkpointed
    monkeypatch.setattr(PeriodicEval, "evaluate", evaluate)
    done = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    checkpoints = Path(done.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000006"]
    report = json.loads((Path(done.model_dir) / "report.json").read_text())
    assert (report["best_global_step"], report["best_metric"], report["final_model_step"]) == (2, 0.8, 2)
    _, evals = lines(done)
    assert [(r["step"], r["eval_reward"]) for r in evals] == [(0, 0.0), (2, 0.8), (4, 0.3), (6, 0.6)]


@pytest.mark.parametrize("grpo, message", [
    ({"eval_steps": 5}, "eval_steps: 5 set, but eval_strategy is 'no'"),
    ({"load_best_model_at_end": True}, "load_best_model_at_end: true set, but eval_strategy is 'no'"),
    ({"eval_strategy": "epoch"}, "grpo.eval_strategy: 'epoch' is not allowed"),
    ({"eval_strategy": "steps", "metric_for_best_model": "loss"}, "grpo.metric_for_best_model: 'loss' is not allowed"),
    ({"eval_strategy": "steps", "eval_steps": 3, "save_steps": 10, "metric_for_best_model": "reward"},
     r"save_steps \(10\) must be a multiple of eval_steps \(3\)"),
    ({"eval_strategy": "steps", "eval_prompts": 0}, "grpo.eval_prompts: input should be greater than 0"),
])
def test_eval_keys_are_checked(grpo, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"grpo": grpo})


def test_eval_key_defaults(tmp_path):
    assert validate_config({}).grpo.eval_strategy == "no"
    (tmp_path / "c.yaml").write_text("grpo:\n  eval_strategy: no\n")  # YAML's false
    assert load_config(tmp_path / "c.yaml").grpo.eval_strategy == "no"
    best = validate_config({"grpo": {"eval_strategy": "steps", "load_best_model_at_end": True}}).grpo
    assert (best.metric_for_best_model, best.greater_is_better) == ("accuracy", True)


def test_a_heldout_set_without_answers_is_refused_before_training(tiny_model, tmp_path):
    train, _ = data(tmp_path)
    heldout = tmp_path / "no-answers.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "0", "prompt": [{"role": "user", "content": "Hi."}],
                                          "question": "Hi.", "answer": ""}]), heldout)
    with pytest.raises(ConfigError, match="none of the 1 held-out rows .* has a gold answer"):
        run_train(eval_config(tmp_path), train, heldout, str(tiny_model), progress=False)


def test_the_default_configs_evaluation_compares_two_different_models(tiny_model, tmp_path):
    """configs/default.yaml, shrunk to seconds (steps, lengths, rows) but its training otherwise
    (LoRA at lr 1e-6 after the format warm-up): the evaluate stage, wired by the DAG, is handed the
    base model and train's final/, and those two load as different models."""
    from transformers import AutoModelForCausalLM

    from grpoflow.base_model import ResolvedModel
    from stages.dag import PreparedRows, Results, run_stage

    train, heldout = data(tmp_path)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "default.yaml", overrides=[
        "grpo.max_steps=1", "grpo.num_generations=4", "grpo.per_device_train_batch_size=4",
        "grpo.max_completion_length=8", "grpo.max_prompt_length=64", "grpo.warmup.rows=8",
        f"grpo.output_dir={tmp_path / 'train'}", "eval.max_samples=2", "eval.max_new_tokens=4",
        f"eval.output_dir={tmp_path / 'eval'}"])
    assert cfg.model.finetune == "lora" and cfg.grpo.warmup.enabled and cfg.grpo.learning_rate == 1e-6
    results = Results(prepare=PreparedRows(train, heldout), model=ResolvedModel(str(tiny_model), "tiny"))
    run_stage("train", cfg, results)
    report = run_stage("evaluate", cfg, results)
    models = {label: figures["model"] for label, figures in report.models.items()}
    assert models == {"base": str(tiny_model), "trained": results.train.model_dir}

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    logits = {}
    for label, path in models.items():  # as the evaluation's transformers engine loads them
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[label] = model(ids).logits
    assert (logits["trained"] - logits["base"]).abs().max() > 1e-5


def test_two_processes_evaluate_as_one_under_fsdp(tiny_model, tmp_path):
    """torchrun, 2 processes, FSDP2 (each generate call gathers the weights: a collective): 3 held-out
    questions split 2 + 1 (padded to 2) reach the same figures and the same best step as one
    process, with no process left waiting."""
    from tests.test_distributed import launch, prepared, two_configs

    grpo = dict(max_steps=2, distributed="fsdp", eval_strategy="steps", eval_steps=1, eval_prompts=3,
                metric_for_best_model="reward")
    one, two = two_configs(tmp_path, "full", **grpo)
    for cfg in (one, two):
        cfg.data.heldout_fraction = 0.25  # 5 of the 20 rows held out
    train, heldout, model = prepared(tmp_path, tiny_model, one, two)
    for cfg in (one, two):
        cfg.eval.reward_funcs = one.grpo.reward_funcs
    single = run_train(one, train, heldout, model, progress=False)
    double = launch(two, 2)
    evals = [lines(r)[1] for r in (single, double)]
    assert [r["step"] for r in evals[1]] == [0, 1, 2] and evals[1][0]["eval_scored"] == 3
    for a, b in zip(*evals):
        for key in ("eval_accuracy", "eval_format_strict", "eval_reward", "eval_mean_completion_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    reports = [json.loads((Path(r.model_dir) / "report.json").read_text()) for r in (single, double)]
    assert reports[0]["best_global_step"] == reports[1]["best_global_step"]
