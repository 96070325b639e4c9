"""TRL as the second reference: our GRPO losses (kernels/reference.py's, and the Triton one) against TRL
1.16.0's GRPOTrainer._compute_loss on the same random inputs, value, gradient and clip metrics, for every
loss_type we share, both importance-sampling levels, with importance-sampling weights, the KL term and
top_entropy_quantile. Runs where TRL is installed (it is not in the lock: PYTHONPATH to a
`pip install --no-deps --target DIR trl==1.16.0` works).

TRL's method runs as written, on a stand-in for the trainer that holds only the attributes it reads and
hands it our log-probs: a whole GRPOTrainer needs a model, a dataset and reward functions, and its
forward would compute log-probs of its own. Its accelerator is a real (one-process) Accelerator.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from accelerate import Accelerator  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from grpoflow.kernels.reference import LOSS_TYPES, grpo_loss, high_entropy_mask  # noqa: E402

if trl.__version__ != "1.16.0":
    pytest.skip(f"TRL {trl.__version__}: these tests compare with 1.16.0's losses", allow_module_level=True)

F64 = torch.float64
B, T, MAX_LEN = 6, 11, 12
OPTIONS = dict(epsilon=0.2, epsilon_high=0.28, delta=1.5, beta=0.04, sapo_temperature_pos=1.2,
               sapo_temperature_neg=2.0)


def _inputs(seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=gen) > 0.25).to(dtype)
    mask[0, 3:] = 0.0  # a short row
    logps = -2.0 * torch.rand(B, T, generator=gen, dtype=dtype)
    return {"logps": logps,
            "old_logps": logps + 0.4 * torch.randn(B, T, generator=gen, dtype=dtype),  # ratios on both sides
            "ref_logps": logps + 0.3 * torch.randn(B, T, generator=gen, dtype=dtype),
            "advantages": torch.randn(B, generator=gen, dtype=dtype),
            "mask": mask,
            "weights": 0.5 + torch.rand(B, T, generator=gen, dtype=dtype),  # vLLM's truncated IS weights
            "entropies": 3.0 * torch.rand(B, T, generator=gen, dtype=dtype)}


def _trl_loss(x: dict[str, torch.Tensor], loss_type: str, level: str, top_entropy_quantile: float):
    """TRL's _compute_loss on x: its loss, the gradient in x's log-probs, and its metrics."""
    logps = x["logps"].clone().requires_grad_()
    args = SimpleNamespace(delta=OPTIONS["delta"], sapo_temperature_pos=OPTIONS["sapo_temperature_pos"],
                           sapo_temperature_neg=OPTIONS["sapo_temperature_neg"], use_bias_correction_kl=False,
                           steps_per_generation=1)
    trainer = SimpleNamespace(
        args=args, loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=top_entropy_quantile,
        epsilon_low=OPTIONS["epsilon"], epsilon_high=OPTIONS["epsilon_high"] if loss_type != "cispo" else 1.3,
        beta=OPTIONS["beta"], max_completion_length=MAX_LEN, off_policy_mask_threshold=None,
        use_vllm=True, vllm_importance_sampling_correction=True, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=Accelerator(cpu=True),
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, x["entropies"], None))
    trainer.get_high_entropy_mask = functools.partial(GRPOTrainer.get_high_entropy_mask, trainer)
    completion_ids = torch.zeros(B, T, dtype=torch.long)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": completion_ids, "completion_mask": x["mask"], "advantages": x["advantages"],
              "old_per_token_logps": x["old_logps"], "ref_per_token_logps": x["ref_logps"],
              "importance_sampling_ratio": x["weights"], "num_items_in_batch": x["mask"].sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, grad, metrics


def _our_loss(fn, x, loss_type, level, top_entropy_quantile):
    logps = x["logps"].clone().requires_grad_()
    keep = high_entropy_mask(x["entropies"], x["mask"], top_entropy_quantile) if top_entropy_quantile < 1 else None
    options = {**OPTIONS, "epsilon_high": 1.3} if loss_type == "cispo" else OPTIONS
    loss, metrics = fn(logps, x["old_logps"], x["ref_logps"], x["advantages"], x["mask"], loss_type=loss_type,
                       importance_sampling_level=level, max_completion_length=MAX_LEN,
                       importance_sampling_ratio=x["weights"], entropy_mask=keep, **options)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss, grad, metrics


CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [1.0, 0.3]))


@pytest.mark.parametrize("loss_type, level, top_entropy_quantile", CASES)
def test_reference_matches_trl_in_float64(loss_type, level, top_entropy_quantile):
    x = _inputs(seed=CASES.index((loss_type, level, top_entropy_quantile)))
    trl_loss, trl_grad, trl_metrics = _trl_loss(x, loss_type, level, top_entropy_quantile)
    loss, grad, metrics = _our_loss(grpo_loss, x, loss_type, level, top_entropy_quantile)
    # TRL makes sapo's temperatures with torch.where(A > 0, 1.2, 2.0): float32 tensors, so 1.2 there is
    # 1.2000000477; everything else agrees to float64's last digits
    rel = 1e-7 if loss_type == "sapo" else 1e-10
    assert loss.item() == pytest.approx(trl_loss.item(), rel=rel, abs=1e-12)
    assert torch.allclose(grad, trl_grad, rtol=rel, atol=1e-12)
    assert grad.abs().sum() > 0  # the comparison means something
    shared = set(metrics) & set(trl_metrics)
    assert shared == set(metrics) - {"ratio/mean"}  # ours has every clip metric TRL logs by the same name
    if level == "sequence":
        return  # there TRL counts a clipped sequence once, ours once per token (kernels/reference.py says so)
    for name in shared:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("loss_type, level, top_entropy_quantile", CASES[::3])
def test_triton_loss_matches_trl(loss_type, level, top_entropy_quantile):
    from grpoflow.kernels.triton_loss import triton_grpo_loss

    x = {k: v.float() for k, v in _inputs(seed=7).items()}
    trl_loss, trl_grad, _ = _trl_loss(x, loss_type, level, top_entropy_quantile)
    loss, grad, _ = _our_loss(triton_grpo_loss, x, loss_type, level, top_entropy_quantile)
    assert abs(loss.item() - trl_loss.item()) <= 1e-5
    assert (grad - trl_grad).abs().max() <= 1e-5


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0])
def test_high_entropy_mask_matches_trl(rho):
    x = _inputs(seed=3)
    trainer = SimpleNamespace(accelerator=Accelerator(cpu=True))
    theirs = GRPOTrainer.get_high_entropy_mask(trainer, x["entropies"], x["mask"], 1 - rho)
    assert torch.equal(high_entropy_mask(x["entropies"], x["mask"], rho), theirs)
