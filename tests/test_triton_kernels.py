"""kernels/triton_logps.py and kernels/triton_loss.py against float64 references and against
kernels/reference.py's grpo_loss; on the CPU they run under Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 when there is no GPU), which is slow: shapes stay small.

Inputs are fresh random draws on every run (the seed is printed on failure).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from grpoflow.kernels import triton_logps  # noqa: E402
from grpoflow.kernels.reference import LOSS_TYPES, grpo_loss  # noqa: E402
from grpoflow.kernels.triton_logps import triton_selective_logps  # noqa: E402
from grpoflow.kernels.triton_loss import triton_grpo_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _inputs(gen, n, h, v, dtype):
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    return hidden, weight, targets


def _reference(hidden, weight, targets, temperature, grad_out):
    """float64 log_softmax -> gather, the entropy, and the gradients of sum(logps * grad_out)."""
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    logps_all = F.log_softmax(hidden64 @ weight64.T / temperature, dim=-1)  # [N, V]
    logps = logps_all.gather(1, targets[:, None]).squeeze(1)  # [N]
    entropy = -(logps_all.exp() * logps_all).sum(-1)  # [N]
    d_hidden, d_weight = torch.autograd.grad((logps * grad_out.double()).sum(), (hidden64, weight64))
    return logps.detach(), entropy.detach(), d_hidden, d_weight


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


# odd sizes: V not a multiple of the 32-wide interpreter tile, one row (T = 1), backward chunks of one
# row and chunks that do not divide N, several vocabulary splits per row block
@pytest.mark.parametrize("n, h, v, chunk_rows, temperature", [
    (37, 16, 101, 16, 0.7), (1, 8, 53, None, 1.0), (9, 20, 300, 1, 1.3), (40, 24, 97, None, 1.0)])
def test_float32_logps_entropy_and_gradients_match_float64(gen, n, h, v, chunk_rows, temperature):
    hidden, weight, targets = _inputs(gen, n, h, v, torch.float32)
    logps, entropy = triton_selective_logps(hidden, weight, targets, temperature=temperature, chunk_rows=chunk_rows,
                                            with_entropy=True)
    grad_out = torch.randn(n, generator=gen).to(DEVICE)
    d_hidden, d_weight = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))
    ref_logps, ref_entropy, ref_d_hidden, ref_d_weight = _reference(hidden, weight, targets, temperature, grad_out)

    assert logps.dtype == torch.float32 and entropy.dtype == torch.float32
    assert (logps.double() - ref_logps).abs().max() <= 1e-5
    assert (entropy.double() - ref_entropy).abs().max() <= 1e-5
    assert _rel(d_hidden, ref_d_hidden) <= 1e-5
    assert _rel(d_weight, ref_d_weight) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_tolerance_of_float64(gen, dtype):
    hidden, weight, targets = _inputs(gen, 33, 16, 75, dtype)
    logps, entropy = triton_selective_logps(hidden, weight, targets, temperature=0.9, chunk_rows=20,
                                            with_entropy=True)
    assert logps.dtype == torch.float32  # accumulated in float32 whatever comes in
    grad_out = torch.randn(33, generator=gen).to(DEVICE)
    d_hidden, d_weight = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))
    assert d_hidden.dtype == dtype and d_weight.dtype == dtype
    # the reference takes the same half-precision inputs, in float64 from there on
    ref_logps, ref_entropy, ref_d_hidden, ref_d_weight = _reference(hidden, weight, targets, 0.9, grad_out)
    assert _rel(logps, ref_logps) <= 2e-2
    assert _rel(entropy, ref_entropy) <= 2e-2
    assert _rel(d_hidden, ref_d_hidden) <= 1e-2
    assert _rel(d_weight, ref_d_weight) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weight_gradient_summed_in_place_over_many_chunks_stays_within_tolerance(gen, dtype):
    """A half-precision lm_head's gradient is summed in its own dtype, rounded once per chunk:
    sixteen chunks must still be within 1e-2 of float64."""
    hidden, weight, targets = _inputs(gen, 64, 16, 90, dtype)
    logps, _ = triton_selective_logps(hidden, weight, targets, chunk_rows=4)
    grad_out = torch.randn(64, generator=gen).to(DEVICE)
    d_weight, = torch.autograd.grad((logps * grad_out).sum(), (weight,))
    assert d_weight.dtype == dtype
    _, _, _, ref_d_weight = _reference(hidden, weight, targets, 1.0, grad_out)
    assert _rel(d_weight, ref_d_weight) <= 1e-2


def test_float32_weights_under_bfloat16_autocast_run_bfloat16_matmuls(gen):
    """The trainer's case: float32 master weights, matmuls in bf16 (tiles are cast as they load)."""
    hidden, weight, targets = _inputs(gen, 24, 16, 70, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logps, _ = triton_selective_logps(hidden, weight, targets)
    d_hidden, d_weight = torch.autograd.grad(logps.sum(), (hidden, weight))
    assert d_hidden.dtype == torch.float32 and d_weight.dtype == torch.float32
    ref_logps, _, ref_d_hidden, ref_d_weight = _reference(hidden, weight, targets, 1.0, torch.ones(24, device=DEVICE))
    assert _rel(logps, ref_logps) <= 2e-2
    assert _rel(d_hidden, ref_d_hidden) <= 1e-2 and _rel(d_weight, ref_d_weight) <= 1e-2
    assert (logps.double() - ref_logps).abs().max() > 1e-5  # the matmuls really ran in bf16


@pytest.mark.parametrize("splits", [3, 7])
def test_any_number_of_vocabulary_splits_merges_to_the_same_values(gen, monkeypatch, splits):
    """3 splits of 4 tiles leave one split a single tile; 7 leave three splits empty."""
    monkeypatch.setattr(triton_logps, "_splits", lambda n, vocab, device: splits)
    hidden, weight, targets = _inputs(gen, 5, 8, 110, torch.float32)
    logps, entropy = triton_selective_logps(hidden, weight, targets, with_entropy=True)
    ref_logps, ref_entropy, _, _ = _reference(hidden, weight, targets, 1.0, torch.ones(5, device=DEVICE))
    assert (logps.double() - ref_logps).abs().max() <= 1e-5
    assert (entropy.double() - ref_entropy).abs().max() <= 1e-5


@pytest.mark.parametrize("n, h, v", [(16 * 1024, 2048, 151_936), (8 * 4096, 4096, 128_256), (64, 576, 49_152),
                                     (10**6, 8192, 256_000)])
def test_backward_chunk_stays_within_the_hidden_states_size_between_the_bounds(n, h, v):
    """the frozen head's d_logits chunk and row vectors: no larger than hidden [N, H] unless under the floor"""
    item = 2  # bfloat16
    rows = triton_logps._chunk_rows(n, h, v, torch.bfloat16, weight_trained=False)
    chunk = rows * v * item
    assert chunk <= triton_logps.CHUNK_BYTES_MAX
    rows_bytes = n * triton_logps.ROW_BYTES
    assert chunk + rows_bytes <= max(n * h * item, triton_logps.CHUNK_BYTES_MIN + rows_bytes)
    budget = min(max(n * h * item - rows_bytes, triton_logps.CHUNK_BYTES_MIN), triton_logps.CHUNK_BYTES_MAX)
    assert chunk > budget - v * item  # as large as the budget allows
    trained = triton_logps._chunk_rows(n, h, v, torch.bfloat16, weight_trained=True)
    assert trained == max(rows, triton_logps.MIN_ROWS_TRAINED_HEAD)


def test_frozen_head_gets_no_weight_gradient(gen):
    """Under LoRA the lm_head is frozen: the backward makes no [V, H] gradient."""
    hidden, weight, targets = _inputs(gen, 6, 8, 40, torch.float32)
    weight = weight.detach()
    logps, entropy = triton_selective_logps(hidden, weight, targets)
    assert entropy is None  # not asked for
    logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_no_rows_and_targets_outside_the_vocabulary(gen):
    hidden, weight, targets = _inputs(gen, 3, 8, 40, torch.float32)
    empty, _ = triton_selective_logps(hidden[:0], weight, targets[:0], with_entropy=True)
    assert empty.shape == (0,)
    (d_weight,) = torch.autograd.grad(empty.sum(), weight)
    assert (d_weight == 0).all()
    # an out-of-range id is a bug upstream: NaN (which the trainer's finiteness check reports), not a number
    logps, _ = triton_selective_logps(hidden, weight, torch.tensor([0, 40, -1], device=DEVICE))
    assert logps[0].isfinite() and logps[1:].isnan().all()


# ---------------------------------------------------------------------------------------
# The fused GRPO loss against kernels/reference.py's grpo_loss


def _loss_inputs(gen, B, T, *, old=True, ref=False, importance_sampling_ratio=None, entropy_mask=False):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    logps = (randn(B, T) * 0.5 - 2.0).float()
    mask = (torch.rand(B, T, generator=gen) > 0.3).float()
    mask[0] = 0.0  # a fully masked row (a completion masked as truncated)
    if B > 2:
        mask[1, 1:] = 0.0  # a one-token row
    # ratios on both sides of the clip band (|log r| up to ~0.6)
    old_logps = (logps.double() + randn(B, T) * 0.3).float() if old else None
    ref_logps = (logps.double() + randn(B, T) * 0.3).float() if ref else None
    if old_logps is not None:
        old_logps[mask == 0] = float("nan")  # padding may hold anything
    weights = None
    if importance_sampling_ratio == "token":
        weights = torch.rand(B, T, generator=gen).float() * 2
    elif importance_sampling_ratio == "sequence":
        weights = torch.rand(B, generator=gen).float() * 2
    advantages = randn(B).float()
    keep = (torch.rand(B, T, generator=gen) > 0.5) & mask.bool() if entropy_mask else None
    return [x.to(DEVICE) if x is not None else None
            for x in (logps, old_logps, ref_logps, advantages, mask, weights, keep)]


def _check_loss_matches_reference(inputs, **kwargs):
    logps, old_logps, ref_logps, advantages, mask, weights, keep = inputs
    logps = logps.requires_grad_()
    loss, metrics = triton_grpo_loss(logps, old_logps, ref_logps, advantages, mask, importance_sampling_ratio=weights,
                                     entropy_mask=keep, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)

    logps64 = logps.detach().double().requires_grad_()
    as64 = [x.double() if x is not None else None for x in (old_logps, ref_logps, advantages, mask, weights)]
    ref_loss, ref_metrics = grpo_loss(logps64, *as64[:4], importance_sampling_ratio=as64[4], entropy_mask=keep,
                                      **kwargs)
    (ref_grad,) = torch.autograd.grad(ref_loss, logps64)

    assert loss.dtype == torch.float32 and grad.dtype == logps.dtype
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert (grad.double() - ref_grad).abs().max() <= 1e-5
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


# every loss_type at both levels, with everything on (old, ref and beta, delta, token weights, the entropy
# mask; cispo's cap 1.3 and sapo's temperatures where the ratios of the inputs, up to ~1.8, reach past them)...
@pytest.mark.parametrize("loss_type, level", itertools.product(LOSS_TYPES, ["token", "sequence"]))
def test_loss_and_gradient_match_the_reference(gen, loss_type, level):
    inputs = _loss_inputs(gen, 5, 23, ref=True, importance_sampling_ratio="token", entropy_mask=True)
    _check_loss_matches_reference(inputs, loss_type=loss_type, importance_sampling_level=level, epsilon=0.2,
                                  epsilon_high=1.3 if loss_type == "cispo" else 0.28, delta=1.4, beta=0.04,
                                  max_completion_length=30, num_items_in_batch=70, sapo_temperature_pos=2.0,
                                  sapo_temperature_neg=3.5)


# ...and the options off or in their other forms
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("options", [
    dict(old=False),  # one update per generation: r = 1, the gradient still flows
    dict(importance_sampling_ratio="sequence"),  # one weight per completion
    dict(T=1),
    dict(B=1, T=1),  # the one row is fully masked: loss 0, gradient 0, no NaN
])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_loss_options_match_the_reference(gen, level, options, loss_type):
    B, T = options.pop("B", 4), options.pop("T", 17)
    inputs = _loss_inputs(gen, B, T, **options)
    _check_loss_matches_reference(inputs, loss_type=loss_type, importance_sampling_level=level)


def test_a_batch_without_tokens_gives_zero_not_nan(gen):
    logps, old_logps, _, advantages, mask, _, _ = _loss_inputs(gen, 3, 6)
    mask.zero_()
    logps.requires_grad_()
    for loss_type in ("grpo", "bnpo", "dapo", "cispo", "sapo"):
        loss, metrics = triton_grpo_loss(logps, old_logps, None, advantages, mask, loss_type=loss_type)
        (grad,) = torch.autograd.grad(loss, logps)
        assert loss.item() == 0.0 and (grad == 0).all() and metrics["ratio/mean"] == 0.0


def test_wrong_inputs_get_the_references_messages(gen):
    logps, old_logps, _, advantages, mask, _, _ = _loss_inputs(gen, 3, 6)
    with pytest.raises(ValueError, match="max_completion_length"):
        triton_grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        triton_grpo_loss(logps, old_logps, None, advantages, mask, beta=0.1)


# ---------------------------------------------------------------------------------------
# The trainer's path: grpoflow/train/loss.py's micro-step loss with `grpo.kernels: triton` against `naive`


def _tiny_lora_policy(vocab: int = 160):
    """A random 2-layer Llama with LoRA adapters, its lm_head tied and frozen (the LoRA case).
    A small vocabulary: the interpreter's time grows with V."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpoflow.train.policy import Policy

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    return Policy(model=model.to(DEVICE), tokenizer=None, device=torch.device(DEVICE), dtype=torch.float32,
                  is_peft=True)


@pytest.mark.parametrize("loss_type, level, options", [
    ("dapo", "token", {}), ("grpo", "sequence", {}),
    ("cispo", "token", {"epsilon_high": 1.02, "top_entropy_quantile": 0.5}),
    ("sapo", "sequence", {"top_entropy_quantile": 0.5, "sapo_temperature_neg": 3.0})])
def test_trainer_loss_and_lora_gradients_match_naive(gen, monkeypatch, loss_type, level, options):
    from grpoflow.config import GRPOConfig
    from grpoflow.kernels import triton_loss
    from grpoflow.train.generation import GenerationBatch
    from grpoflow.train.loss import micro_step_loss

    calls = []  # the fused kernels really run (no silent fallback)
    for module, name in ((triton_logps, "triton_selective_logps"), (triton_loss, "triton_grpo_loss")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))

    policy = _tiny_lora_policy()
    B, P, T = 3, 4, 6
    input_ids = torch.randint(3, 160, (B, P + T), generator=gen).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left-padded prompt
    attention_mask[1, -3:] = 0  # a completion that stopped early
    completion_mask = attention_mask[:, -T:].float()
    old_logps = (torch.randn(B, T, generator=gen) * 0.1 - 5.0).to(DEVICE)  # ratios on both sides of the band
    micro = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
             "advantages": torch.randn(B, generator=gen).to(DEVICE), "old_logps": old_logps,
             "importance_sampling_ratio": torch.rand(B, T, generator=gen).to(DEVICE), "sampling_logps": None}
    buffer = GenerationBatch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                             advantages=micro["advantages"], old_logps=old_logps,
                             importance_sampling_ratio=micro["importance_sampling_ratio"],
                             sampling_logps=None, num_items=int(completion_mask.sum()), metrics={})
    adapters = [p for p in policy.model.parameters() if p.requires_grad]
    results = {}
    for kernels in ("triton", "naive"):
        # beta > 0: the reference log-probs go through the same path with the adapters switched off
        grpo = GRPOConfig(kernels=kernels, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                          delta=1.5, temperature=0.8, **options)
        loss, metrics = micro_step_loss(policy, micro, buffer, grpo, ref_model=None)
        results[kernels] = loss, metrics, torch.autograd.grad(loss, adapters)
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results["triton"], results["naive"]
    # policy log-probs, reference log-probs (adapters off), loss
    assert sorted(calls) == ["triton_grpo_loss", "triton_selective_logps", "triton_selective_logps"]
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert metrics.keys() == ref_metrics.keys() and "entropy" in metrics
    for name in ref_metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], abs=1e-5), name
    for grad, ref_grad in zip(grads, ref_grads):
        assert _rel(grad, ref_grad.double()) <= 1e-4


def test_the_warm_up_cross_entropy_matches_transformers_labels_loss_on_every_path(gen, monkeypatch):
    """The format warm-up's loss (labelled_nll): transformers' `labels=` cross-entropy, value and LoRA
    gradients, through the Triton and chunked kernels too, which never make the [B, L, V] logits."""
    from grpoflow.train.logps import labelled_nll

    calls = []
    fn = triton_logps.triton_selective_logps
    monkeypatch.setattr(triton_logps, "triton_selective_logps", lambda *a, **k: calls.append(1) or fn(*a, **k))
    policy = _tiny_lora_policy()
    input_ids = torch.randint(3, 160, (3, 9), generator=gen).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -3:] = 0  # a shorter row, right-padded
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[attention_mask == 0] = -100
    adapters = [p for p in policy.model.parameters() if p.requires_grad]
    expected = policy.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, adapters)
    for kernels in ("triton", "chunked", "naive"):
        loss = labelled_nll(policy.model, input_ids, attention_mask, labels, kernels=kernels)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5), kernels
        for grad, ref in zip(torch.autograd.grad(loss, adapters), expected_grads):
            assert _rel(grad, ref.double()) <= 1e-4, kernels
    assert calls == [1]  # the Triton path ran its kernel


def test_triton_without_a_gpu_falls_back_to_chunked_with_one_warning(monkeypatch, caplog):
    from grpoflow.train import logps

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(logps, "_warned", set())
    with caplog.at_level("WARNING", logger="grpoflow.train"):
        assert logps.triton_or_fallback(torch.device("cpu")) == "chunked"
        assert logps.loss_function("triton", torch.device("cpu")) is grpo_loss  # the reference loss
    assert caplog.text.count("grpo.kernels=triton") == 1 and "chunked" in caplog.text


def test_auto_takes_triton_on_a_gpu_and_chunked_elsewhere_without_a_warning(monkeypatch, caplog):
    from types import SimpleNamespace

    from grpoflow.kernels import triton_support
    from grpoflow.kernels.reference import grpo_loss
    from grpoflow.train import logps

    monkeypatch.setattr(logps, "_warned", set())
    with caplog.at_level("WARNING", logger="grpoflow.train"):
        # the CPU takes chunked even where the interpreter could run the kernels (it is for tests: slow)
        assert logps.resolve_kernels("auto", torch.device("cpu")) == "chunked"
        assert logps.loss_function("auto", torch.device("cpu")) is grpo_loss
        assert logps.resolve_kernels("auto", torch.device("cuda")) == "triton"  # triton is installed here
        no_triton = SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None))
        monkeypatch.setattr(triton_support, "importlib", no_triton)
        assert logps.resolve_kernels("auto", torch.device("cuda")) == "chunked"  # a GPU without triton
    assert caplog.text == ""  # auto says nothing: nothing asked for was refused
    assert [logps.resolve_kernels(k, torch.device("cpu")) for k in ("chunked", "naive")] == ["chunked", "naive"]


def test_without_triton_installed_the_reason_says_how_to_get_it(monkeypatch):
    from types import SimpleNamespace

    from grpoflow.kernels import triton_support

    assert triton_support.triton_unavailable(DEVICE) is None  # here: CUDA, or the interpreter (conftest)
    no_triton = SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None))
    monkeypatch.setattr(triton_support, "importlib", no_triton)
    assert "pip install triton" in triton_support.triton_unavailable(DEVICE)


def test_heads_the_fused_path_does_not_model_fall_back_to_naive(caplog):
    from grpoflow.train.logps import completion_logps

    policy = _tiny_lora_policy()
    policy.model.get_base_model().config.final_logit_softcapping = 30.0  # Gemma-2-style: tanh after the matmul
    ids = torch.randint(3, 160, (1, 8)).to(DEVICE)
    with caplog.at_level("WARNING", logger="grpoflow.train"):
        logps, _ = completion_logps(policy.model, ids, torch.ones_like(ids), 3, temperature=1.0, kernels="triton")
    assert logps.shape == (1, 3)
    assert "grpo.kernels=triton" in caplog.text and "final_logit_softcapping" in caplog.text
