"""kernels/chunked.py against a float64 log-softmax: values, gradients, odd shapes, dtypes.

Inputs are fresh random draws on every run (the seed is printed on failure), so a kernel that is
right only for one draw does not pass by luck.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from grpoflow.kernels.chunked import chunk_rows_for, chunked_selective_logps


@pytest.fixture
def gen():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _inputs(gen, n, h, v, dtype=torch.float64):
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def _reference(hidden, weight, targets, temperature):
    """float64 log_softmax -> gather, and the entropy, on the full [N, V] logits."""
    logps_all = F.log_softmax(hidden.double() @ weight.double().T / temperature, dim=-1)  # [N, V]
    logps = logps_all.gather(1, targets[:, None]).squeeze(1)  # [N]
    entropy = -(logps_all.exp() * logps_all).sum(-1)  # [N]
    return logps, entropy


# odd sizes: V not a multiple of the chunk, one row, chunks of one row, a chunk larger than N
@pytest.mark.parametrize("n, h, v, chunk_rows", [(37, 16, 101, 8), (1, 8, 53, 4), (9, 4, 7, 1), (5, 12, 300, 64)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_values_and_gradients_match_float64(gen, n, h, v, chunk_rows, temperature):
    hidden, weight, targets = _inputs(gen, n, h, v, torch.float32)
    logps, entropy = chunked_selective_logps(hidden, weight, targets, temperature=temperature, chunk_rows=chunk_rows,
                                             with_entropy=True)
    grad_out = torch.randn(n, generator=gen)
    d_hidden, d_weight = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))

    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    ref_logps, ref_entropy = _reference(hidden64, weight64, targets, temperature)
    ref_d_hidden, ref_d_weight = torch.autograd.grad((ref_logps * grad_out.double()).sum(), (hidden64, weight64))

    assert logps.dtype == torch.float32 and entropy.dtype == torch.float32
    assert (logps.double() - ref_logps).abs().max() <= 1e-5
    assert (entropy.double() - ref_entropy).abs().max() <= 1e-5
    assert _rel(d_hidden, ref_d_hidden) <= 1e-5
    assert _rel(d_weight, ref_d_weight) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_two_percent_of_float64(gen, dtype):
    hidden, weight, targets = _inputs(gen, 64, 32, 211, dtype)
    logps, _ = chunked_selective_logps(hidden, weight, targets, chunk_rows=16)
    assert logps.dtype == torch.float32  # accumulated in float32 whatever comes in
    grad_out = torch.randn(64, generator=gen)
    d_hidden, d_weight = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))
    assert d_hidden.dtype == dtype and d_weight.dtype == dtype

    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    ref_logps, _ = _reference(hidden64, weight64, targets, 1.0)
    ref_d_hidden, ref_d_weight = torch.autograd.grad((ref_logps * grad_out.double()).sum(), (hidden64, weight64))
    assert _rel(logps, ref_logps) <= 2e-2
    assert _rel(d_hidden, ref_d_hidden) <= 2e-2
    assert _rel(d_weight, ref_d_weight) <= 2e-2


def test_float32_master_weights_under_bfloat16_autocast(gen):
    """The trainer's case: float32 weights and hidden states, matmuls in bf16 (autocast)."""
    hidden, weight, targets = _inputs(gen, 48, 16, 97, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = chunked_selective_logps(hidden, weight, targets, chunk_rows=10)
    d_hidden, d_weight = torch.autograd.grad(logps.sum(), (hidden, weight))
    assert d_hidden.dtype == torch.float32 and d_weight.dtype == torch.float32  # grads in the parameters' dtype
    ref_logps, _ = _reference(hidden, weight, targets, 1.0)
    assert _rel(logps, ref_logps) <= 2e-2
    # the matmuls really ran in bf16: float32 agreement would be ~1e-7
    assert (logps.double() - ref_logps).abs().max() > 1e-5


def test_gradcheck_float64(gen):
    hidden, weight, targets = _inputs(gen, 7, 5, 13)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_selective_logps(h, w, targets, temperature=0.8, chunk_rows=3)[0], (hidden, weight))


def test_frozen_head_gets_no_weight_gradient(gen):
    """Under LoRA the lm_head is frozen: the backward must not spend a [V, H] matmul on it."""
    hidden, weight, targets = _inputs(gen, 6, 4, 11)
    weight = weight.detach()
    logps, _ = chunked_selective_logps(hidden, weight, targets, chunk_rows=4)
    logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_no_entropy_unless_asked(gen):
    hidden, weight, targets = _inputs(gen, 3, 4, 9)
    assert chunked_selective_logps(hidden, weight, targets)[1] is None


def test_chunk_rows_bound_the_float32_logits():
    assert chunk_rows_for(49_152) * 49_152 * 4 <= 64 * 2**20
    assert chunk_rows_for(10**12) == 1


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()
