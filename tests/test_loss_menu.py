"""kernels/reference.py's CISPO and SAPO losses and the top_entropy_quantile mask, against values worked
out by hand (in the comment next to each) and their gradients against finite differences. The Triton
loss is checked against the same reference in test_triton_kernels.py, TRL's in test_loss_trl.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpoflow.kernels.reference import grpo_loss, high_entropy_mask

F64 = torch.float64


def _case(ratios, advantages, mask, old: float = -1.0):
    """logps [B, T] whose ratio to old_logps = old is `ratios`, with old_logps, advantages and mask."""
    ratios = torch.tensor(ratios, dtype=F64)
    old_logps = torch.full_like(ratios, old)
    logps = (old_logps + torch.log(ratios)).requires_grad_()
    return logps, old_logps, torch.tensor(advantages, dtype=F64), torch.tensor(mask, dtype=F64)


# --- cispo: -sg(min(r, epsilon_high)) * A * logp, over the tokens of the generation ---------------------
#
# epsilon_high = 1.2 (the cap itself). old_logps = -1, so logp = -1 + ln r.
#   row 0, A = +1: r = 1.5 -> weight 1.2 (capped: cispo_clip_ratio counts it); r = 0.5 -> 0.5; padding
#   row 1, A = -2: r = 0.5 -> 0.5; r = 1.5 -> 1.2 (capped, but A < 0: not counted); r = 1.1 -> 1.1
# d loss / d logp = -weight * A / 5 tokens: every token keeps a gradient, the capped ones too
CISPO = dict(ratios=[[1.5, 0.5, 3.0], [0.5, 1.5, 1.1]], advantages=[1.0, -2.0], mask=[[1, 1, 0], [1, 1, 1]])


def test_cispo_weights_the_log_prob_by_the_capped_detached_ratio():
    logps, old_logps, advantages, mask = _case(**CISPO)
    loss, metrics = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="cispo", epsilon_high=1.2)
    lp = lambda r: -1 + math.log(r)  # noqa: E731
    per_token = [-1.2 * 1 * lp(1.5), -0.5 * 1 * lp(0.5), 0.5 * 2 * lp(0.5), 1.2 * 2 * lp(1.5), 1.1 * 2 * lp(1.1)]
    assert loss.item() == pytest.approx(sum(per_token) / 5, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = torch.tensor([[-1.2, -0.5, 0.0], [1.0, 2.4, 2.2]], dtype=F64) / 5
    assert torch.allclose(grad, expected, rtol=1e-12, atol=0)
    assert metrics == pytest.approx({"cispo_clip_ratio": 1 / 5, "ratio/mean": (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5})


def test_cispo_normalises_by_the_generation_tokens_like_dapo():
    logps, old_logps, advantages, mask = _case(**CISPO)
    loss5 = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="cispo", epsilon_high=5.0)[0]
    loss20 = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="cispo", epsilon_high=5.0,
                       num_items_in_batch=20)[0]
    assert loss20.item() == pytest.approx(loss5.item() * 5 / 20, rel=1e-12)


def test_cispo_ignores_padding_log_probs_of_minus_infinity():
    logps, old_logps, advantages, mask = _case(**CISPO)
    logps = logps.detach().clone()
    logps[0, 2] = -math.inf
    logps.requires_grad_()
    loss = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="cispo", epsilon_high=5.0)[0]
    (grad,) = torch.autograd.grad(loss, logps)
    assert loss.isfinite() and grad.isfinite().all() and grad[0, 2] == 0


# --- sapo: -(4 / tau) * sigmoid(tau * (r - 1)) * A, the mean of per-sequence token means ----------------
#
# A ratio r = 1 + ln(3) / tau puts the gate at sigmoid(ln 3) = 3/4: the term is -(4 / tau) * 3/4 * A = -3 A / tau,
# and its gradient -A * 4 * (3/4) * (1/4) * r = -0.75 * A * r. At r = 1 the gate is 1/2: -2 A / tau, gradient -A.
# tau = 2 for A > 0 (sapo_temperature_pos), tau = 4 for A <= 0 (_neg).
#   row 0, A = +1, tau 2: r = 1 + ln(3)/2, r = 1; padding      row 1, A = -1, tau 4: r = 1 + ln(3)/4
def test_sapo_gate_values_and_gradients_by_hand():
    r0, r1 = 1 + math.log(3) / 2, 1 + math.log(3) / 4
    logps, old_logps, advantages, mask = _case([[r0, 1.0, 7.0], [r1, 1.0, 1.0]], [1.0, -1.0], [[1, 1, 0], [1, 0, 0]])
    loss, metrics = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="sapo",
                              sapo_temperature_pos=2.0, sapo_temperature_neg=4.0)
    row0 = (-3 / 2 + -2 / 2) / 2  # two tokens
    row1 = 3 / 4  # one token: -3 * (-1) / 4
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = torch.tensor([[-0.75 * r0 / 2 / 2, -1 / 2 / 2, 0.0], [0.75 * r1 / 2, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert set(metrics) == {"ratio/mean"}  # no clip, no clip ratios


def test_sapo_gradient_fades_smoothly_far_from_one_where_the_clip_cuts_it():
    # r = e^2 with A > 0: grpo's clip gives exactly 0; sapo's gate a small, nonzero gradient
    logps, old_logps, advantages, mask = _case([[math.exp(2.0)]], [1.0], [[1]])
    sapo = torch.autograd.grad(grpo_loss(logps, old_logps, None, advantages, mask, loss_type="sapo")[0], logps)[0]
    grpo = torch.autograd.grad(grpo_loss(logps, old_logps, None, advantages, mask, loss_type="grpo")[0], logps)[0]
    s = 1 / (1 + math.exp(-(math.exp(2.0) - 1)))  # tau = 1
    assert grpo.item() == 0.0
    assert sapo.item() == pytest.approx(-4 * s * (1 - s) * math.exp(2.0), rel=1e-12) and sapo.item() < 0


# (not cispo: its gradient is by design not its value's derivative, since the ratio weighting the log-prob
# is held constant; its gradient is checked by hand above and against TRL's in test_loss_trl.py)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_gradients_match_finite_differences(level):
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    logps = (-3 * torch.rand(4, 4, generator=generator, dtype=F64)).requires_grad_()
    old_logps = logps.detach() - 0.5 * torch.randn(4, 4, generator=generator, dtype=F64)
    ref_logps = logps.detach() + 0.3 * torch.randn(4, 4, generator=generator, dtype=F64)
    weights = 0.5 + torch.rand(4, 4, generator=generator, dtype=F64)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    advantages = torch.tensor([0.7, -1.3, -0.4, 1.1], dtype=F64)

    def loss_of(lp):
        return grpo_loss(lp, old_logps, ref_logps, advantages, mask, loss_type="sapo", beta=0.04, importance_sampling_level=level, importance_sampling_ratio=weights,
                         sapo_temperature_pos=1.5, sapo_temperature_neg=2.5, entropy_mask=keep)[0]

    assert torch.autograd.gradcheck(loss_of, (logps,), eps=1e-6, atol=1e-8)


# --- top_entropy_quantile -----------------------------------------------------------------------------
#
# entropies [[0.1, 0.9, 0.5], [0.3, 0.7, 5.0]], the 5.0 padding: sorted 0.1 0.3 0.5 0.7 0.9. The (1 - rho)
# quantile by linear interpolation sits at position (1 - rho) * 4: rho = 0.4 -> 2.4 -> 0.5 + 0.4 * 0.2 = 0.58,
# keeping 0.9 and 0.7; rho = 1 -> 0.1, keeping all 5; rho = 0 -> 0.9 alone.
ENTROPIES = [[0.1, 0.9, 0.5], [0.3, 0.7, 5.0]]
ENTROPY_MASK = [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("rho, kept", [(0.4, [[0, 1, 0], [0, 1, 0]]), (1.0, ENTROPY_MASK),
                                       (0.0, [[0, 1, 0], [0, 0, 0]])])
def test_high_entropy_mask_by_hand(rho, kept):
    keep = high_entropy_mask(torch.tensor(ENTROPIES), torch.tensor(ENTROPY_MASK), rho)
    assert keep.dtype == torch.bool and keep.tolist() == [[bool(k) for k in row] for row in kept]


def test_high_entropy_mask_takes_the_threshold_over_every_process():
    # a second process's tokens all have entropy 2.0: over all 10 the top 20% are the two 2.0s of the
    # other process... and none of this one's (its highest, 0.9, is below the 0.8 quantile, 2.0)
    other = torch.full((5,), 2.0)
    keep = high_entropy_mask(torch.tensor(ENTROPIES), torch.tensor(ENTROPY_MASK), 0.2,
                             gather=lambda local: torch.cat([local, other]))
    assert not keep.any()
    alone = high_entropy_mask(torch.tensor(ENTROPIES), torch.tensor(ENTROPY_MASK), 0.2)
    assert alone.tolist() == [[False, True, False], [False, False, False]]


def test_entropy_mask_drops_the_policy_term_but_not_the_kl_or_the_token_count():
    # no old_logps: r = 1, the policy term is -A per token. Kept tokens: (0, 1) and (1, 1), A = 1 and -2.
    # dapo over all 5 tokens: (-1 + 2) / 5; the KL term (logps = ref: k3 = 0) adds nothing
    logps = torch.full((2, 3), -1.0, dtype=F64, requires_grad=True)
    keep = torch.tensor([[0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    mask = torch.tensor(ENTROPY_MASK, dtype=F64)
    loss, _ = grpo_loss(logps, None, logps.detach(), torch.tensor([1.0, -2.0], dtype=F64), mask, beta=0.1,
                        entropy_mask=keep)
    assert loss.item() == pytest.approx(1 / 5, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad.tolist() == [[0.0, -1 / 5, 0.0], [0.0, 2 / 5, 0.0]]


def _gather_in_process(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from grpoflow.train.loss import all_processes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values = torch.arange(3 + 2 * rank, dtype=torch.float32) + 10 * rank  # 3 values on rank 0, 5 on rank 1
        torch.save(all_processes(values), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_processes_gathers_lists_of_different_lengths_in_rank_order(tmp_path):
    # two real gloo processes: what the entropy threshold of top_entropy_quantile is taken over under torchrun
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_in_process, args=(port, str(tmp_path / "gathered")), nprocs=2)
    expected = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"gathered.{rank}").tolist() == expected
