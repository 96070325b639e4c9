"""grpo.offload_activations on CPU: the gradients are those of plain gradient checkpointing (full
fine-tuning and LoRA with dropout, whose masks the recompute must draw again), and a run trains."""

import json
import os
from pathlib import Path

import pytest
import torch

from grpoflow.config import validate_config
from grpoflow.train import offload
from grpoflow.train.checkpoint import run_key
from grpoflow.train.logps import completion_logps
from grpoflow.train.policy import load_policy
from stages.train import run_train
from tests.test_train import config, data, metrics


def gradients(tiny_model: Path, finetune: str, offload_activations: bool) -> dict[str, torch.Tensor]:
    cfg = validate_config({"model": {"finetune": finetune, "dtype": "float32",
                                     "lora": {"dropout": 0.5, "target_modules": ["q_proj", "v_proj", "up_proj"]}},
                           "grpo": {"gradient_checkpointing": True, "offload_activations": offload_activations}})
    torch.manual_seed(0)
    policy = load_policy(cfg.model, cfg.grpo, str(tiny_model), torch.device("cpu"))
    if finetune == "lora":  # adapters that are not zero, so that dropout changes the output
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on one row
    torch.manual_seed(2)  # the dropout masks of the forward
    logps, _ = completion_logps(policy.model, ids, mask, 12, temperature=1.0, kernels="chunked")
    (logps * torch.linspace(-1, 1, 12)).sum().backward()
    return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradients_equal_plain_checkpointing(tiny_model, finetune, monkeypatch):
    pushed = []
    real = offload.ActivationOffload.push
    monkeypatch.setattr(offload.ActivationOffload, "push", lambda self, t: (pushed.append(t.shape), real(self, t))[1])
    plain = gradients(tiny_model, finetune, offload_activations=False)
    assert not pushed
    offloaded = gradients(tiny_model, finetune, offload_activations=True)
    assert len(pushed) == 2 and all(s == (3, 24, 32) for s in pushed)  # each layer's input, [B, T, H]
    assert plain.keys() == offloaded.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], offloaded[name], rtol=1e-5, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in offloaded.values())


def test_pinned_buffers_are_reused_from_step_to_step(tiny_model):
    cfg = validate_config({"model": {"finetune": "full", "dtype": "float32"},
                           "grpo": {"gradient_checkpointing": True, "offload_activations": True}})
    policy = load_policy(cfg.model, cfg.grpo, str(tiny_model), torch.device("cpu"))
    offloader = next(m._gradient_checkpointing_func.args[0] for m in policy.model.modules()
                     if hasattr(m, "_gradient_checkpointing_func"))
    ids = torch.randint(0, 1000, (2, 16))
    buffers = []
    for _ in range(2):
        logps, _ = completion_logps(policy.model, ids, torch.ones_like(ids), 8, temperature=1.0, kernels="chunked")
        buffers.append({id(s.host) for s in offloader.slots})
        logps.sum().backward()
        assert offloader.slots == []  # the backward took every layer input back
    assert buffers[0] == buffers[1]


def test_a_run_with_offload_trains_as_one_without(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    plain = run_train(config(tmp_path / "plain", max_steps=2, gradient_checkpointing=True), train, heldout,
                      str(tiny_model), progress=False)
    offloaded = run_train(config(tmp_path / "offload", max_steps=2, gradient_checkpointing=True,
                                 offload_activations=True), train, heldout, str(tiny_model), progress=False)
    cfg = config(tmp_path / "plain", max_steps=2, gradient_checkpointing=True)
    other = cfg.model_copy(deep=True)
    other.grpo.offload_activations = True
    assert run_key(cfg, train, str(tiny_model)) == run_key(other, train, str(tiny_model))  # a memory setting
    for a, b in zip(metrics(plain), metrics(offloaded)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert json.loads((Path(offloaded.model_dir) / "report.json").read_text())["steps"] == 2


def test_expandable_segments_reach_the_allocators_settings_and_keep_the_users(tiny_model, tmp_path, monkeypatch):
    from stages.train import GRPORecipe

    train, heldout = data(tmp_path)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:False")
    GRPORecipe(config(tmp_path, max_steps=1), train, heldout, str(tiny_model))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512,expandable_segments:False"  # off: untouched
    cfg = config(tmp_path, max_steps=1, expandable_segments=True)
    GRPORecipe(cfg, train, heldout, str(tiny_model))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512,expandable_segments:True"
    plain = config(tmp_path, max_steps=1)
    assert run_key(cfg, train, str(tiny_model)) == run_key(plain, train, str(tiny_model))  # a memory setting
    # unset (null), it follows the rollout mode: on in async mode, where generation and training share the card
    for mode, setting, expected in (("async", None, "True"), ("async", False, "False"), ("sync", None, "False")):
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:False")
        chosen = config(tmp_path, max_steps=1, expandable_segments=setting)
        chosen.rollout.mode = mode
        GRPORecipe(chosen, train, heldout, str(tiny_model))
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == f"max_split_size_mb:512,expandable_segments:{expected}", mode
    # on a GPU the allocator already started takes it too (torch's call stood in for: this torch has no CUDA)
    from grpoflow.train.memory import use_expandable_segments

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    use_expandable_segments()
    assert calls == ["expandable_segments:True"]


def test_offload_needs_gradient_checkpointing():
    with pytest.raises(Exception, match="gradient_checkpointing: true"):
        validate_config({"grpo": {"gradient_checkpointing": False, "offload_activations": True}})


def test_metrics_break_the_memory_down(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    result = run_train(config(tmp_path, max_steps=1), train, heldout, str(tiny_model), progress=False)
    step = metrics(result)[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    weights = sum(p.numel() for p in model.parameters()) * 4 / 2**30  # float32, the tied head counted once
    assert step["memory/weights_gib"] == pytest.approx(weights) and step["memory/trainable_gib"] == pytest.approx(weights)
    assert step["memory/optimizer_gib"] == pytest.approx(2 * weights, rel=1e-3)  # AdamW: two moments (and its steps)


def test_an_out_of_memory_names_the_settings_that_need_less(tiny_model, tmp_path, monkeypatch):
    from grpoflow.train.memory import OutOfMemory
    from stages import train as train_stage

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_stage, "micro_step_loss", oom)
    train, heldout = data(tmp_path)
    with pytest.raises(OutOfMemory) as caught:
        run_train(config(tmp_path, max_steps=1, gradient_checkpointing=True), train, heldout, str(tiny_model),
                  progress=False)
    message = str(caught.value)
    assert "training pass of step 1" in message and "Tried to allocate 20.00 GiB" in message
    assert "grpo.offload_activations: true" in message and "grpo.max_completion_length (8)" in message
    assert "Settings that need less: grpo.expandable_segments: true" in message  # first: it changes no computation
    # a process whose allocator grows its segments already (the setting, or the user's own variable) is not told to
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(OutOfMemory) as caught:
        run_train(config(tmp_path / "again", max_steps=1, gradient_checkpointing=True), train, heldout,
                  str(tiny_model), progress=False)
    assert "expandable_segments" not in str(caught.value) and "grpo.offload_activations: true" in str(caught.value)


def test_a_micro_batch_whose_layer_inputs_cannot_fit_is_refused_before_a_step(monkeypatch):
    from types import SimpleNamespace

    from grpoflow.batching import BatchPlan
    from grpoflow.errors import ConfigError
    from grpoflow.train.memory import check_fits, checkpointed_inputs_bytes

    grpo = validate_config({"grpo": {"per_device_train_batch_size": 8, "max_completion_length": 20_000,
                                     "max_prompt_length": 512}}).grpo
    shape = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)  # Llama-3.1-8B
    need = checkpointed_inputs_bytes(shape, grpo, torch.bfloat16)
    assert need == 32 * 8 * 20_512 * 4096 * 2  # 40 GiB
    policy = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, model=SimpleNamespace(config=shape))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * 2**30, 80 * 2**30))
    with pytest.raises(ConfigError, match=r"keeps 40.1 GiB of layer inputs.*offload_activations: true"):
        check_fits(policy, grpo, BatchPlan.from_config(grpo))
    grpo.offload_activations = True
    check_fits(policy, grpo, BatchPlan.from_config(grpo))  # on the host: nothing to refuse
