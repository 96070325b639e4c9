"""The GRPO trainer on CPU: tiny random models, real generate, real optimizer, real checkpoints."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from grpoflow.config import ConfigError, validate_config
from grpoflow.train.checkpoint import trained_weights
from stages import train as train_stage
from stages.train import TrainingDiverged, run_train

# A reward a tiny random model can learn quickly: the share of the completion that is spaces.
SPACES_REWARD = '''
def spaces(prompts, completions, **_):
    return [text.count(" ") / max(1, len(text)) for text in completions]
'''


def data(tmp_path: Path, n: int = 16) -> tuple[Path, Path]:
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Say something about {i}."}],
             "question": f"Say something about {i}.", "answer": str(i), "solution": f"It is {i}.",
             "origin": f"t:{i}", "metadata": None} for i in range(n)]
    train, heldout = tmp_path / "train.parquet", tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(rows), train)
    pq.write_table(pa.Table.from_pylist(rows[:4]), heldout)
    return train, heldout


def config(tmp_path: Path, **grpo) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(SPACES_REWARD)
    settings = {"learning_rate": 3e-3, "max_steps": 4, "num_generations": 4, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1, "max_completion_length": 8, "max_prompt_length": 64,
                "reward_funcs": [f"{reward_file}:spaces"], "warmup": {"enabled": False},
                "gradient_checkpointing": False, "save_steps": 1, "log_completions_steps": 2,
                "output_dir": str(tmp_path / "train"), "seed": 3}
    settings.update(grpo)
    return validate_config({"model": {"finetune": "full", "dtype": "float32"}, "grpo": settings})


def metrics(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_mean_reward_rises_on_a_learnable_task(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    # top_k: a random model spreads its mass over the whole vocabulary; the 50 likeliest tokens learn faster
    cfg = config(tmp_path, max_steps=24, num_generations=8, per_device_train_batch_size=16, save_steps=24,
                 learning_rate=1e-2, top_k=50)
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    rewards = [m["reward"] for m in metrics(result)]
    assert len(rewards) == 24
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    report = json.loads((Path(result.model_dir) / "report.json").read_text())
    assert report["steps"] == 24 and (Path(result.output_dir) / "reward.png").stat().st_size > 1000
    assert (Path(result.model_dir) / "model.safetensors").is_file()  # full fine-tune: the whole model


def test_metrics_use_trl_names(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    result = run_train(config(tmp_path, max_steps=2), train, heldout, str(tiny_model), progress=False)
    step = metrics(result)[0]
    for key in ("loss", "reward", "reward_std", "frac_reward_zero_std", "rewards/spaces/mean", "rewards/spaces/std",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "entropy",
                "grad_norm", "learning_rate", "step_seconds", "generation/tokens_per_second", "train/tokens_per_second"):
        assert key in step, key
    parts = [step["time/weight_sync_seconds"], step["time/train_seconds"], step["time/optimizer_seconds"]]
    assert all(t >= 0 for t in parts) and sum(parts) + step["generation/seconds"] <= step["step_seconds"]
    assert step["generation/fastest_process_seconds"] == step["generation/seconds"]  # one process: the same one
    logged = [json.loads(line) for line in (Path(result.output_dir) / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged} == {2} and len(logged) == 4  # one prompt x 4 completions at step 2
    assert {"prompt", "completion", "reward", "advantage", "rewards/spaces"} <= set(logged[0])


def test_resume_mid_generation_matches_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    """Two micro-batches per generation: crash on the second of the second generation, resume."""
    train, heldout = data(tmp_path)
    common = dict(max_steps=5, num_generations=4, per_device_train_batch_size=2, steps_per_generation=2)
    whole = run_train(config(tmp_path / "a", **common), train, heldout, str(tiny_model), progress=False)

    real = train_stage.micro_step_loss
    calls = {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_stage, "micro_step_loss", crash_on_fourth)
    cfg = config(tmp_path / "b", **common)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)
    monkeypatch.setattr(train_stage, "micro_step_loss", real)
    saved = torch.load(next((Path(cfg.grpo.output_dir)).glob("*/checkpoints/step-000003")) / "trainer_state.pt",
                       weights_only=False)
    assert saved["next_micro"] == 1 and saved["buffers"][0] is not None  # stopped inside a generation
    assert "trainable" not in saved  # the weights are in model/ only
    assert not saved["at_generation_boundary"]
    resumed = run_train(cfg, train, heldout, str(tiny_model), progress=False)

    a, b = metrics(whole), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in ("loss", "reward", "grad_norm", "completions/mean_length"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa = trained_weights(next(Path(whole.output_dir).glob("checkpoints/step-000005")))
    wb = trained_weights(next(Path(resumed.output_dir).glob("checkpoints/step-000005")))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_stop_after_checkpoints_and_the_same_call_resumes(tiny_model, tmp_path):
    """A time-limited job: stop past the deadline with a checkpoint (not at a save step), then finish."""
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=3, save_steps=100)
    stopped = run_train(cfg, train, heldout, str(tiny_model), progress=False, stop_after_s=0)
    assert not stopped.finished and stopped.steps == 1 and stopped.model_dir == ""
    assert Path(stopped.report["checkpoint"]).name == "step-000001"
    done = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert done.finished and done.steps == 3
    assert [m["step"] for m in metrics(done)] == [1, 2, 3]


def test_lora_resume_takes_the_adapters_from_the_checkpoint(tiny_model, tmp_path):
    """The checkpoint's model/ folder is the only copy of the trained weights: a LoRA run stopped
    after its first step and resumed ends with the adapters of an uninterrupted run."""
    train, heldout = data(tmp_path)

    def lora(path: Path):
        cfg = config(path, max_steps=3)
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"finetune": "lora"})})

    whole = run_train(lora(tmp_path / "a"), train, heldout, str(tiny_model), progress=False)
    cfg = lora(tmp_path / "b")
    first = run_train(cfg, train, heldout, str(tiny_model), progress=False, stop_after_s=0)
    assert not first.finished and first.steps == 1
    after_one = trained_weights(Path(first.report["checkpoint"]))
    resumed = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    wa = trained_weights(next(Path(whole.output_dir).glob("checkpoints/step-000003")))
    wb = trained_weights(next(Path(resumed.output_dir).glob("checkpoints/step-000003")))
    assert wa and all("lora_" in k for k in wa)  # adapters only
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert any(not torch.allclose(after_one[k], wb[k]) for k in wb)  # the adapters did move after the resume


def test_every_completion_truncated_is_no_nan(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=2, max_completion_length=2, mask_truncated_completions=True,
                 loss_type="grpo")
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    for m in metrics(result):
        assert m["completions/clipped_ratio"] == 1.0
        assert m["loss"] == 0.0 and m["grad_norm"] == 0.0


def test_non_finite_steps_stop_the_run_with_a_checkpoint(tiny_model, tmp_path, monkeypatch):
    train, heldout = data(tmp_path)

    def nan_loss(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        return loss * float("nan"), m

    real = train_stage.micro_step_loss
    monkeypatch.setattr(train_stage, "micro_step_loss", nan_loss)
    cfg = config(tmp_path, max_steps=10, max_nonfinite_steps=3, save_steps=100)
    with pytest.raises(TrainingDiverged, match=r"^3 optimizer steps in a row had a non-finite loss or gradient "
                                               r"\(step 3\); checkpoint kept at .*step-000003\. Lower grpo.learning_rate"):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)


def test_lora_saves_adapters_only_and_qlora_needs_a_gpu(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=1).model_copy(deep=True)
    cfg.model.finetune = "lora"
    cfg.model.lora.target_modules = ["q_proj", "v_proj"]
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert (Path(result.model_dir) / "adapter_model.safetensors").is_file()
    assert not (Path(result.model_dir) / "model.safetensors").exists()
    if not torch.cuda.is_available():
        cfg.model.finetune = "qlora"
        with pytest.raises(ConfigError, match="model.finetune: qlora needs a CUDA GPU"):
            run_train(cfg, train, heldout, str(tiny_model), progress=False)


def test_a_policy_sharing_vllms_weights_reaches_the_card_only_after_the_engine_started(tiny_model, tmp_path,
                                                                                       monkeypatch):
    """LoRA on a colocated vLLM (shares_base_weights): the policy loads into host memory, the engine
    starts (and takes the base weights as its own), then the rest of the policy moves to the card;
    never the base weights twice on the card. Forced here, with the transformers engine."""
    events = []
    real_load, real_engine, real_to = train_stage.load_policy, train_stage.make_engine, torch.nn.Module.to
    monkeypatch.setattr(train_stage, "shares_base_weights", lambda cfg: True)
    monkeypatch.setattr(train_stage, "load_policy", lambda *a, **k: (events.append(("load", k["to_device"])),
                                                                     real_load(*a, **k))[1])
    monkeypatch.setattr(train_stage, "make_engine", lambda *a, **k: (events.append(("engine",)),
                                                                     real_engine(*a, **k))[1])
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: (
        events.append(("to", type(self).__name__)) if type(self).__name__.startswith("PeftModel") else None,
        real_to(self, *a, **k))[1])
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=1).model_copy(deep=True)
    cfg.model.finetune = "lora"
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert events[:3] == [("load", False), ("engine",), ("to", "PeftModelForCausalLM")]
    assert result.finished and torch.isfinite(torch.tensor(metrics(result)[0]["loss"]))


def test_memory_vllm_released_for_a_whole_phase_is_not_in_that_phases_peak(monkeypatch):
    """torch's allocator statistics count vLLM's released sleep-mode memory as allocated (its addresses
    stay reserved): on an H100, an 8B LoRA step's train phase read 45.7 GiB while the card held about
    25. A phase through which the memory stayed released has it taken out; one that mapped it again
    (generation) keeps it."""
    from types import SimpleNamespace

    from grpoflow.train.log import StepMeter

    gib = 2**30
    allocated = {"now": 40 * gib, "peak": 40 * gib}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: allocated["peak"] + 3 * gib)  # cached blocks
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: allocated["now"])
    engine = SimpleNamespace(released=20 * gib, wakes=0)
    engine.released_bytes = lambda: engine.released
    meter = StepMeter(torch.device("cuda"), engine)  # the KV cache (20 GiB) released by the step before

    engine.released, engine.wakes = 0, 1  # generate maps it again
    allocated["peak"] = 42 * gib
    engine.released = 20 * gib  # and it is released when sampling ends
    meter.end("generation")
    meter.training_starts()
    allocated["peak"] = 47 * gib  # the training pass: 7 GiB of activations over the 40 torch counts
    meter.end("train")
    meter.end("optimizer")
    out = meter.metrics()
    assert out["memory/generation_peak_gib"] == 42  # the KV cache was on the card then
    assert out["memory/train_peak_gib"] == 27 and out["memory/train_transient_gib"] == 7
    assert out["memory/optimizer_peak_gib"] == 20 and out["memory/peak_gib"] == 42
    assert out["memory/reserved_peak_gib"] == 45  # the generation's 42 and 3 cached
    assert StepMeter(torch.device("cuda")).metrics().keys() == {"step_seconds", "train/tokens_per_second",
                                                                 *StepMeter.PARTS.values()}  # no engine: as before


def test_format_warmup_reports_before_and_after(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=1, warmup={"rows": 8, "batch_size": 4, "eval_prompts": 2, "epochs": 3,
                                                "learning_rate": 1e-2})
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    warm = result.report["warmup"]
    assert warm["rows"] == 8 and warm["steps"] == 6 and warm["eval_prompts"] == 2
    assert warm["loss_last"] < warm["loss_first"]  # it trained on the worked solutions
    # rates over 2 prompts; 8 new tokens cannot hold <reasoning>...</answer>, before or after
    assert warm["format_strict_before"] == warm["format_strict_after"] == 0.0
    assert {warm["format_soft_before"], warm["format_soft_after"]} <= {0.0, 0.5, 1.0}


def test_format_warmup_takes_worked_solutions_from_another_source(tiny_model, tmp_path):
    """Training rows without solutions (a reasoning-gym task) warm up on grpo.warmup.source's, prompted alike."""
    train, heldout = data(tmp_path)
    table = pq.read_table(train)
    pq.write_table(table.drop(["solution"]), train)  # no worked solutions in the training data
    source = tmp_path / "worked.jsonl"
    source.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
                              + "\n" for i in range(12)))
    warmup = {"rows": 8, "batch_size": 4, "eval_prompts": 2, "epochs": 1, "learning_rate": 1e-2}
    skipped = run_train(config(tmp_path / "a", max_steps=1, warmup=warmup), train, heldout, str(tiny_model),
                        progress=False)
    assert skipped.report["warmup"] == {"skipped": "no worked solutions"}
    cfg = config(tmp_path / "b", max_steps=1, warmup={**warmup, "source": str(source)})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"output_dir": tmp_path / "data"})})
    warm = run_train(cfg, train, heldout, str(tiny_model), progress=False).report["warmup"]
    assert warm["rows"] == 8 and warm["steps"] == 2
    prepared = next((tmp_path / "data").glob("*/train.parquet"))
    row = pq.read_table(prepared).to_pylist()[0]
    assert row["solution"].startswith(row["question"].split()[2]) and row["prompt"][0]["role"] == "system"


def test_the_policy_trains_in_train_mode_with_checkpointing(tiny_model, tmp_path):
    """eval mode silently turns gradient checkpointing off (5x the memory on the GPU, measured)."""
    from grpoflow.train.policy import load_policy

    cfg = config(tmp_path, gradient_checkpointing=True)
    policy = load_policy(cfg.model, cfg.grpo, str(tiny_model))
    checkpointing = getattr(policy.model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.24
        checkpointing = policy.model.is_gradient_checkpointing
    assert policy.model.training and checkpointing


def test_warmup_targets_earn_every_format_reward():
    from grpoflow.answer_format import format_answer
    from grpoflow.rewards import RewardSet

    target = format_answer("Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72.", "72")
    scores = RewardSet(["correctness", "int", "strict_format", "soft_format", "xmlcount"]).score(
        ["p"], [target], answer=["72"])
    assert scores.per_reward == {"correctness": [2.0], "int": [0.5], "strict_format": [0.5], "soft_format": [0.5],
                                 "xmlcount": [0.5]}


@pytest.mark.parametrize("kernels", ["chunked", "naive"])
def test_logps_match_a_plain_log_softmax_at_any_temperature(tiny_model, kernels):
    from transformers import AutoModelForCausalLM

    from grpoflow.train.logps import completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    weight = model.get_output_embeddings().weight
    for temperature in (1.0, 0.7):
        ours, entropy = completion_logps(model, ids, mask, 5, temperature=temperature, with_entropy=True,
                                         kernels=kernels)  # [2, 5]
        (grad_ours,) = torch.autograd.grad(ours.sum(), weight)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -6:-1, :] / temperature
        all_logps = torch.log_softmax(logits, -1)
        expected = all_logps.gather(-1, ids[:, -5:, None]).squeeze(-1)
        (grad_expected,) = torch.autograd.grad(expected.sum(), weight)
        assert torch.allclose(ours, expected, atol=1e-5)
        # the in-place scaling keeps the backward right. rtol: the chunked path sums the tied weight's
        # gradient (up to ~5 here) in another order than the full-logits one, float32 rounding of 2e-4 on
        # its small entries (transformers 5.25; a wrong backward is off by orders of magnitude)
        assert torch.allclose(grad_ours, grad_expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(entropy, -(all_logps.exp() * all_logps).sum(-1).detach(), atol=1e-5)


def test_chunked_logps_skip_the_padding_after_eos_and_work_under_lora(tiny_model):
    """Padding after a short completion gets log-prob 0 (never read: the loss masks it); LoRA
    models take the chunked path through peft's wrapper and give the naive path's numbers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from grpoflow.train.logps import completion_logps, plain_lm_head

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert plain_lm_head(model) is not None
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # the first completion stopped 2 tokens early
    chunked, _ = completion_logps(model, ids, mask, 5, temperature=1.0, kernels="chunked")
    naive, _ = completion_logps(model, ids, mask, 5, temperature=1.0, kernels="naive")
    written = mask[:, -5:].bool()
    assert torch.allclose(chunked[written], naive[written], atol=1e-5)
    assert (chunked[~written] == 0).all()
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    grads = [torch.autograd.grad(x[written].sum(), lora_b)[0] for x in (chunked, naive)]
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_heads_the_chunked_path_does_not_model_fall_back_to_naive(tiny_model, caplog):
    from transformers import AutoModelForCausalLM

    from grpoflow.train.logps import completion_logps, plain_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.final_logit_softcapping = 30.0  # Gemma-2-style: tanh after the matmul
    with caplog.at_level("WARNING", logger="grpoflow.train"):
        assert plain_lm_head(model) is None
    assert "final_logit_softcapping" in caplog.text and "naive path" in caplog.text
    ids = torch.randint(3, 1000, (1, 8))
    logps, _ = completion_logps(model, ids, torch.ones_like(ids), 3, temperature=1.0, kernels="chunked")
    assert logps.shape == (1, 3)


def test_vllm_on_a_machine_without_a_gpu_is_refused_before_any_work(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = config(tmp_path).model_copy(update={"rollout": validate_config({"rollout": {"engine": "vllm"}}).rollout})
    with pytest.raises(ConfigError, match=r"rollout.engine: vllm needs a CUDA GPU"):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)


def test_samples_from_another_engine_get_truncated_importance_weights(tiny_model, tmp_path):
    """An engine with its own copy of the weights returns its sampling log-probs; the trainer's
    own log-probs against them give min(ratio, cap) per token. transformers' processed log-probs
    of the same model must agree with the trainer's: ratio 1. On-policy, the weights are made at
    the loss from its own log-probs (no second forward pass); off-policy, at generation."""
    from grpoflow.rewards import RewardSet
    from grpoflow.rollout.hf import HFEngine
    from grpoflow.train.generation import generate_batch
    from grpoflow.train.loss import micro_step_loss
    from grpoflow.train.policy import load_policy

    class OtherEngine(HFEngine):
        name = "other"

    cfg = config(tmp_path, temperature=0.7, max_completion_length=6)
    policy = load_policy(cfg.model, cfg.grpo, str(tiny_model))
    engine = OtherEngine(policy.model, policy.tokenizer, batch_size=4, progress=False)
    rows = [{"prompt": [{"role": "user", "content": f"Count to {i}."}], "answer": str(i)} for i in range(2)]
    rewards = RewardSet(cfg.grpo.reward_funcs)

    on_policy = generate_batch(engine, policy, rows, rewards, cfg.grpo, need_old_logps=False, micro_batch=4)
    assert on_policy.importance_sampling_ratio is None and on_policy.old_logps is None
    assert on_policy.sampling_logps.shape == on_policy.completion_mask.shape
    micro = on_policy.slice(0, 2)
    assert micro["sampling_logps"].shape == (2, on_policy.completion_len)
    _, metrics = micro_step_loss(policy, micro, on_policy, cfg.grpo, None)
    assert metrics["sampling/sampling_logp_difference/max"] < 1e-4
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)

    off_policy = generate_batch(engine, policy, rows, rewards, cfg.grpo, need_old_logps=True, micro_batch=4)
    mask = off_policy.completion_mask.bool()
    assert off_policy.old_logps is not None and off_policy.sampling_logps is None
    assert torch.allclose(off_policy.importance_sampling_ratio[mask], torch.ones(int(mask.sum())), atol=1e-4)
    assert off_policy.metrics["sampling/sampling_logp_difference/max"] < 1e-4

    off = cfg.grpo.model_copy(update={"vllm_importance_sampling_correction": False})
    plain = generate_batch(engine, policy, rows, rewards, off, need_old_logps=False, micro_batch=4)
    assert plain.importance_sampling_ratio is None and plain.sampling_logps is None
    _, metrics = micro_step_loss(policy, plain.slice(0, 2), plain, off, None)
    assert "sampling/importance_sampling_ratio/mean" not in metrics


def test_importance_weights_are_truncated_at_the_cap():
    from grpoflow.rollout.base import Completion
    from grpoflow.train.generation import _sampling_logps, importance_weights

    completions = [Completion([1], [5, 6], "", [-1.0, -2.0], True), Completion([1], [7], "", [-0.5], True)]
    trainer = torch.tensor([[-0.5, -2.5], [-0.5, 0.0]])  # [N, T]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ratio, metrics = importance_weights(trainer, _sampling_logps(completions, 2, "cpu"), mask, cap=1.5)
    expected = torch.tensor([[1.5, torch.exp(torch.tensor(-0.5))], [1.0, 1.0]])  # e^0.5 = 1.65 -> 1.5
    assert torch.allclose(ratio, expected)
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(1.5)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(0.5)
