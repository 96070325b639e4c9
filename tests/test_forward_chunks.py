"""grpo.max_tokens_per_forward on CPU: a micro-batch trained in parts of rows, each as wide as its own
rows, gives the loss and gradients of the micro-batch in one forward, for every loss normalisation."""

from pathlib import Path

import pytest
import torch

from grpoflow.train.checkpoint import trained_weights
from grpoflow.train.generation import GenerationBatch
from grpoflow.train.logps import completion_logps
from stages.train import run_train
from tests.test_train import config, data, metrics


def batch(prompts: list[int], completions: list[int], P: int = 6, T: int = 5) -> GenerationBatch:
    """Rows with left-padded prompts of the given lengths and completions written from column 0."""
    N = len(prompts)
    ids = torch.randint(5, 1000, (N, P + T), generator=torch.Generator().manual_seed(0))
    attention = torch.zeros(N, P + T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        attention[i, P - p:P] = 1
        attention[i, P:P + c] = 1
    mask = attention[:, P:].float()
    return GenerationBatch(ids, attention, mask, torch.arange(N, dtype=torch.float32), torch.randn(N, T), None, None,
                           int(mask.sum()), {})


def test_rows_keep_only_the_padding_one_of_them_needs():
    b = batch(prompts=[2, 4, 3], completions=[1, 3, 5])
    part = b.rows_of([0, 1])
    assert part["input_ids"].shape == (2, 4 + 3)  # prompts of 2 and 4 tokens, completions of 1 and 3
    assert torch.equal(part["input_ids"], b.input_ids[:2, 2:9])
    assert torch.equal(part["old_logps"], b.old_logps[:2, :3]) and part["completion_mask"].sum() == 4
    assert torch.equal(b.rows_of([2])["attention_mask"], torch.ones(1, 3 + 5, dtype=torch.long))


def test_parts_hold_at_most_the_token_budget_longest_first():
    b = batch(prompts=[2, 4, 3, 1], completions=[1, 3, 5, 2])
    assert b.forward_chunks(0, 4, None) == [[0, 1, 2, 3]]
    parts = b.forward_chunks(0, 4, 14)
    assert sorted(r for part in parts for r in part) == [0, 1, 2, 3] and parts[0][0] == 2  # 3 + 5 tokens first
    for part in parts:
        widths = b.rows_of(part)["input_ids"].shape
        assert len(part) == 1 or widths[0] * widths[1] <= 14
    assert b.forward_chunks(0, 4, 1) == [[2], [1], [0], [3]]  # a row over the budget still gets its forward


def test_trimmed_rows_give_the_same_log_probs(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    b = batch(prompts=[2, 4, 3], completions=[1, 3, 5])
    whole, _ = completion_logps(model, b.input_ids, b.attention_mask, b.completion_len, temperature=1.0)
    for rows in ([0, 1], [2], [0]):
        part = b.rows_of(rows)
        mine, _ = completion_logps(model, part["input_ids"], part["attention_mask"], part["completion_mask"].shape[1],
                                   temperature=1.0)
        mask = part["completion_mask"].bool()
        assert torch.allclose(mine[mask], whole[rows][:, :mask.shape[1]][mask], atol=1e-5), rows


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_parts_train_as_the_whole_micro_batch(tiny_model, tmp_path, loss_type):
    train, heldout = data(tmp_path)
    common = dict(max_steps=2, loss_type=loss_type, num_generations=4, per_device_train_batch_size=8,
                  max_completion_length=12, save_steps=1)
    whole = run_train(config(tmp_path / "whole", **common), train, heldout, str(tiny_model), progress=False)
    parts = run_train(config(tmp_path / "parts", max_tokens_per_forward=40, **common), train, heldout,
                      str(tiny_model), progress=False)
    for a, b in zip(metrics(whole), metrics(parts)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (loss_type, a["step"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (loss_type, a["step"])
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
    wa = trained_weights(next(Path(whole.output_dir).glob("checkpoints/step-000002")))
    wb = trained_weights(next(Path(parts.output_dir).glob("checkpoints/step-000002")))
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 2e-5, worst  # lr 3e-3: a wrong share would move weights by ~1e-3


def test_ignore_eos_runs_every_completion_to_its_length(tiny_model, tmp_path):
    """rollout.ignore_eos (benchmarks): no completion stops early, even where the model would end at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpoflow.rollout import HFEngine, SamplingParams
    from grpoflow.train.checkpoint import run_key

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    engine = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model), progress=False)
    prompt = [[{"role": "user", "content": "Say something."}]]
    first = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0))[0][0].token_ids[0]
    model.generation_config.eos_token_id = first  # greedy decoding now ends at its first token
    for ignore_eos, length in ((False, 1), (True, 12)):
        (completion,), = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=ignore_eos))
        assert len(completion.token_ids) == length and completion.finished == (not ignore_eos), ignore_eos

    train, _ = data(tmp_path)
    cfg = config(tmp_path, max_steps=1)
    with_eos = cfg.model_copy(deep=True)
    cfg.rollout.ignore_eos = True
    assert run_key(cfg, train, str(tiny_model)) != run_key(with_eos, train, str(tiny_model))
