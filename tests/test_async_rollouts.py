"""rollout.mode: async and grpo.dynamic_sampling on CPU: a tiny random model, the transformers
engine sampling in a thread of its own while the trainer trains, real checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from grpoflow.config import ConfigError
from grpoflow.train.checkpoint import trained_weights
from grpoflow.train.rollouts import SnapshotEngine
from stages import train as train_stage
from stages.train import run_train
from tests.test_train import config, data, metrics

# Groups of even rows all score 1 (tied: no gradient); odd rows score their completion's length, which
# differs between completions of a random model
HALF_TIED = '''
def half_tied(prompts, completions, answer, **_):
    return [1.0 if int(a) % 2 == 0 else float(len(text)) for a, text in zip(answer, completions)]
'''
ALL_TIED = '''
def all_tied(prompts, completions, **_):
    return [1.0 for _ in completions]
'''


def with_reward(tmp_path: Path, source: str, name: str, **grpo):
    cfg = config(tmp_path, **grpo)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    cfg.grpo.reward_funcs = [f"{path}:{name}"]
    return cfg


def asynchronous(cfg, staleness: int = 1):
    cfg.rollout.mode, cfg.rollout.max_staleness = "async", staleness
    return cfg


def test_async_samples_each_generation_one_step_behind_and_corrects_for_it(tiny_model, tmp_path, monkeypatch):
    synced = []
    real = SnapshotEngine.sync_weights
    monkeypatch.setattr(SnapshotEngine, "sync_weights", lambda self, policy, step: (synced.append(step),
                                                                                      real(self, policy, step)))
    train, heldout = data(tmp_path)
    cfg = asynchronous(config(tmp_path, max_steps=5, save_steps=100))
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    steps = metrics(result)
    # the first generation is sampled when training starts; each next one while the step before trains,
    # from the weights of that step; the one that no step would train on is never started
    assert synced == [0, 0, 1, 2, 3]
    assert [m["rollout/staleness"] for m in steps] == [0, 1, 1, 1, 1]
    for m in steps:
        assert m["rollout/wait_seconds"] >= 0
        # the sampler's own log-probs came back, and the loss weighs the lag with them
        assert 0 < m["sampling/importance_sampling_ratio/mean"] <= cfg.grpo.vllm_importance_sampling_cap
        assert torch.isfinite(torch.tensor(m["loss"]))
    assert result.finished and (Path(result.model_dir) / "model.safetensors").is_file()


def test_async_draws_and_samples_what_sync_does_when_the_weights_stay_put(tiny_model, tmp_path):
    """With a learning rate too small to move a weight, the only difference left is the thread:
    the same prompts, seeds and completions, so the same rewards at every step."""
    train, heldout = data(tmp_path)
    common = dict(max_steps=4, save_steps=100, learning_rate=1e-30)
    sync = run_train(config(tmp_path / "sync", **common), train, heldout, str(tiny_model), progress=False)
    ahead = run_train(asynchronous(config(tmp_path / "async", **common)), train, heldout, str(tiny_model),
                      progress=False)
    assert Path(sync.output_dir).name != Path(ahead.output_dir).name  # async is another run, not a resume of it
    for s, a in zip(metrics(sync), metrics(ahead)):
        for key in ("reward", "reward_std", "completions/mean_length"):
            assert s[key] == a[key], (s["step"], key)
        assert a["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)


def test_async_resume_repeats_the_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    """Killed inside step 4: the checkpoint of step 3 holds the generation sampled ahead (by the
    weights of step 2), and the resumed run trains on it and samples what the whole run did."""
    train, heldout = data(tmp_path)
    common = dict(max_steps=5, save_steps=1)
    whole = run_train(asynchronous(config(tmp_path / "a", **common)), train, heldout, str(tiny_model),
                      progress=False)

    real, calls = train_stage.micro_step_loss, {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_stage, "micro_step_loss", crash_on_fourth)
    cfg = asynchronous(config(tmp_path / "b", **common))
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)
    monkeypatch.setattr(train_stage, "micro_step_loss", real)
    saved = torch.load(next(Path(cfg.grpo.output_dir).glob("*/checkpoints/step-000003")) / "trainer_state.pt",
                       weights_only=False)
    ahead = saved["rollouts_ahead"][0]
    assert ahead["ready"].version == 2 and ahead["start_at"] is None  # sampled by the weights of step 2, for step 4
    resumed = run_train(cfg, train, heldout, str(tiny_model), progress=False)

    a, b = metrics(whole), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in ("loss", "reward", "grad_norm", "completions/mean_length", "rollout/staleness"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa = trained_weights(next(Path(whole.output_dir).glob("checkpoints/step-000005")))
    wb = trained_weights(next(Path(resumed.output_dir).glob("checkpoints/step-000005")))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_async_with_two_steps_a_generation_starts_the_next_one_step_before_it_is_needed(tiny_model, tmp_path,
                                                                                         monkeypatch):
    synced = []
    real = SnapshotEngine.sync_weights
    monkeypatch.setattr(SnapshotEngine, "sync_weights", lambda self, policy, step: (synced.append(step),
                                                                                      real(self, policy, step)))
    train, heldout = data(tmp_path)
    cfg = asynchronous(config(tmp_path, max_steps=6, save_steps=100, per_device_train_batch_size=2,
                              steps_per_generation=2))
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    # generations are trained at steps 0-1, 2-3, 4-5: the second starts after step 1, the third after step 3
    assert synced == [0, 1, 3]
    assert [m["rollout/staleness"] for m in metrics(result)] == [0, 1, 1, 2, 1, 2]


def test_async_lora_trains_and_the_sampler_copy_shares_the_frozen_weights(tiny_model, tmp_path, monkeypatch):
    copies = []
    real = SnapshotEngine.__init__
    monkeypatch.setattr(SnapshotEngine, "__init__", lambda self, engine, policy: (real(self, engine, policy),
                                                                                   copies.append((self, policy)))[0])
    train, heldout = data(tmp_path)
    cfg = asynchronous(config(tmp_path, max_steps=3, save_steps=100))
    cfg.model.finetune, cfg.model.lora.target_modules = "lora", ["q_proj", "v_proj"]
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert result.finished and [m["rollout/staleness"] for m in metrics(result)] == [0, 1, 1]
    (engine, policy), = copies
    frozen = [(a, b) for a, b in zip(engine.model.parameters(), policy.model.parameters()) if not b.requires_grad]
    trained = [(a, b) for a, b in zip(engine.model.parameters(), policy.model.parameters()) if b.requires_grad]
    assert frozen and all(a.data_ptr() == b.data_ptr() for a, b in frozen)  # one copy of the base weights
    assert trained and all(a.data_ptr() != b.data_ptr() for a, b in trained)


def test_async_needs_the_importance_sampling_correction(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = asynchronous(config(tmp_path, max_steps=1))
    cfg.grpo.vllm_importance_sampling_correction = False
    with pytest.raises(ConfigError, match="vllm_importance_sampling_correction"):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dynamic_sampling_trains_on_groups_with_signal_only(tiny_model, tmp_path, mode):
    train, heldout = data(tmp_path)
    cfg = with_reward(tmp_path, HALF_TIED, "half_tied", max_steps=4, save_steps=100, num_generations=4,
                      per_device_train_batch_size=8, dynamic_sampling=True, dynamic_sampling_max_draws=8)
    cfg.rollout.mode = mode
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    steps = metrics(result)
    for m in steps:
        assert m["dynamic_sampling/frac_reward_zero_std_trained"] == 0  # no tied group reached the loss
        assert m["dynamic_sampling/groups_masked"] == 0
        # what was drawn: tied groups among them, dropped, and the draws went on until two had signal
        assert m["dynamic_sampling/prompts_drawn"] == m["dynamic_sampling/groups_dropped"] + 2
    assert sum(m["dynamic_sampling/groups_dropped"] for m in steps) > 0
    assert any(m["frac_reward_zero_std"] > 0 for m in steps)  # logged as drawn, as without dynamic sampling
    trained_ids = json.loads((Path(result.model_dir) / "trained_ids.json").read_text())
    assert trained_ids and all(int(i) % 2 == 1 for i in trained_ids)  # only rows whose groups carry a gradient


def test_dynamic_sampling_stops_at_its_cap_and_masks_what_is_missing(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = with_reward(tmp_path, ALL_TIED, "all_tied", max_steps=2, save_steps=100, num_generations=4,
                      per_device_train_batch_size=8, dynamic_sampling=True, dynamic_sampling_max_draws=3)
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    for m in metrics(result):
        assert m["dynamic_sampling/draws"] == 3  # the cap: three generate calls, then it gives up
        assert m["dynamic_sampling/groups_masked"] == 2  # the whole generation, masked out of the loss
        # the first draw is the generation's 2 prompts; each refill 8x what is missing, the most it draws
        assert m["dynamic_sampling/prompts_drawn"] == 2 + 16 + 16
        assert m["grad_norm"] == 0 and m["loss"] == 0
    report = json.loads((Path(result.model_dir) / "report.json").read_text())
    assert report["rows_trained"] == 0  # a masked group is no row trained on: it goes back to the pool


def test_dynamic_sampling_refills_in_proportion_to_what_it_keeps(tiny_model, tmp_path):
    """Half the groups tie: a refill draws what is missing over the share kept so far."""
    train, heldout = data(tmp_path, n=64)
    cfg = with_reward(tmp_path, HALF_TIED, "half_tied", max_steps=3, save_steps=100, num_generations=4,
                      per_device_train_batch_size=32, dynamic_sampling=True, dynamic_sampling_max_draws=8)
    result = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    for m in metrics(result):
        assert m["dynamic_sampling/groups_masked"] == 0
        assert m["dynamic_sampling/draws"] <= 4  # 8 prompts, about 4 kept, ~8 more drawn, ...
