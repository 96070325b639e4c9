"""kernels/reference.py: the GRPO loss against values worked out by hand, its gradients against
finite differences, and the log-softmax / entropy references against closed forms.

Every expected number below is derived in the comment next to it from the ratios r, the
advantages A and the band [1 - epsilon, 1 + epsilon_high]; none comes from re-running the formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpoflow.kernels.reference import entropy_from_logits, grpo_loss, selective_log_softmax

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]
F64 = torch.float64


def _logps_for(ratios: torch.Tensor, old: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logps, old_logps [B, T] whose per-token ratio exp(logps - old_logps) is `ratios`."""
    old_logps = torch.full_like(ratios, old)
    return (old_logps + torch.log(ratios)).requires_grad_(), old_logps


# --- token level: both sides of the band, both signs of A ---------------------------------------
#
# epsilon = 0.2: band [0.8, 1.2]. Per-token loss = -min(r * A, clip(r) * A).
#   row 0, A = +1: r = 1.5 above the band -> -1.2 (high-clipped); r = 0.5 below -> -0.5 (not clipped:
#                  the min keeps the smaller, unclipped r); the third token is padding (r = 3 ignored)
#   row 1, A = -2: r = 0.5 below -> -min(-1.0, -1.6) = 1.6 (low-clipped); r = 1.5 above -> -min(-3.0, -2.4)
#                  = 3.0 (not clipped); r = 1.1 inside -> 2.2
# masked sum = -1.2 - 0.5 + 1.6 + 3.0 + 2.2 = 5.1 over 5 tokens; row sums -1.7 (2 tokens), 6.8 (3 tokens)
TOKEN_RATIOS = [[1.5, 0.5, 3.0], [0.5, 1.5, 1.1]]
TOKEN_ADVANTAGES = [1.0, -2.0]
TOKEN_MASK = [[1, 1, 0], [1, 1, 1]]
TOKEN_EXPECTED = {
    "grpo": (-1.7 / 2 + 6.8 / 3) / 2,  # mean over sequences of per-sequence token means
    "bnpo": 5.1 / 5,
    "dr_grpo": 5.1 / (2 * 4),  # B = 2, max_completion_length = 4
    "dapo": 5.1 / 5,  # num_items_in_batch defaults to this batch's 5 tokens
}


def _token_case(dtype=F64):
    logps, old_logps = _logps_for(torch.tensor(TOKEN_RATIOS, dtype=dtype))
    return logps, old_logps, torch.tensor(TOKEN_ADVANTAGES, dtype=dtype), torch.tensor(TOKEN_MASK, dtype=dtype)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_level_loss_and_clip_metrics_by_hand(loss_type):
    logps, old_logps, advantages, mask = _token_case()
    loss, metrics = grpo_loss(logps, old_logps, None, advantages, mask, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(TOKEN_EXPECTED[loss_type], rel=1e-12)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 5)  # row 1, r = 0.5, A < 0
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 5)  # row 0, r = 1.5, A > 0
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    assert metrics["ratio/mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5)  # padding's 3.0 left out
    assert "kl" not in metrics  # beta = 0
    assert all(isinstance(v, float) for v in metrics.values())


def test_dapo_divides_by_the_generation_batch_token_count():
    logps, old_logps, advantages, mask = _token_case()
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dapo", num_items_in_batch=17)
    assert loss.item() == pytest.approx(5.1 / 17)
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dapo",
                        num_items_in_batch=torch.tensor(17))
    assert loss.item() == pytest.approx(5.1 / 17)


def test_epsilon_high_widens_only_the_upper_side():
    # band [0.8, 1.6]: row 0's r = 1.5 is now inside -> -1.5 instead of -1.2; row 1's r = 0.5 is still
    # low-clipped. Sum 5.1 - 0.3 = 4.8 over 5 tokens.
    logps, old_logps, advantages, mask = _token_case()
    loss, metrics = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="bnpo", epsilon_high=0.6)
    assert loss.item() == pytest.approx(4.8 / 5)
    assert metrics["clip_ratio/high_mean"] == 0.0
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 5)


def test_delta_caps_the_unclipped_branch_for_negative_advantages():
    # delta = 1.4: row 1 (A = -2), r = 1.5 -> -min(1.4 * -2, 1.2 * -2) = 2.8 instead of 3.0.
    # Row 0 (A = +1), r = 1.5 -> -min(1.4, 1.2) = -1.2: unchanged, the band already caps A > 0.
    logps, old_logps, advantages, mask = _token_case()
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="bnpo", delta=1.4)
    assert loss.item() == pytest.approx((5.1 - 0.2) / 5)


# --- sequence level (GSPO) ---------------------------------------------------------------------
#
# r_i = exp(mean of the sequence's active log-ratios) = geometric mean of its active token ratios.
#   row 0, A = +1, 2 tokens, r = (2 * 1.125) ** 0.5 = 1.5 -> -1.2 per token (high-clipped)
#   row 1, A = -2, 2 tokens, r = (0.25 * 1) ** 0.5 = 0.5 -> -min(-1.0, -1.6) = 1.6 per token (low-clipped)
#   row 2, A = -1, 3 tokens, r = (4 * 2 * 1) ** (1/3) = 2 -> -min(-2.0, -1.2) = 2.0 per token (not clipped)
#   row 3, A = +5, fully masked: contributes 0
# masked sum = -2.4 + 3.2 + 6.0 = 6.8 over 7 tokens; padding ratios (7, 9, 3) must not enter any mean
SEQ_RATIOS = [[2.0, 1.125, 7.0], [0.25, 1.0, 9.0], [4.0, 2.0, 1.0], [3.0, 3.0, 3.0]]
SEQ_ADVANTAGES = [1.0, -2.0, -1.0, 5.0]
SEQ_MASK = [[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]]
SEQ_EXPECTED = {
    "grpo": (-1.2 + 1.6 + 2.0 + 0.0) / 4,  # the empty row counts in the mean over sequences, as in TRL
    "bnpo": 6.8 / 7,
    "dr_grpo": 6.8 / (4 * 3),  # B = 4, max_completion_length = 3
    "dapo": 6.8 / 7,
}


def _sequence_case():
    logps, old_logps = _logps_for(torch.tensor(SEQ_RATIOS, dtype=F64))
    return logps, old_logps, torch.tensor(SEQ_ADVANTAGES, dtype=F64), torch.tensor(SEQ_MASK, dtype=F64)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sequence_level_loss_and_clip_metrics_by_hand(loss_type):
    logps, old_logps, advantages, mask = _sequence_case()
    loss, metrics = grpo_loss(logps, old_logps, None, advantages, mask, loss_type=loss_type,
                              importance_sampling_level="sequence", max_completion_length=3)
    assert loss.item() == pytest.approx(SEQ_EXPECTED[loss_type], rel=1e-12)
    # metrics count active tokens, each carrying its sequence's ratio
    assert metrics["clip_ratio/low_mean"] == pytest.approx(2 / 7)  # row 1's 2 tokens
    assert metrics["clip_ratio/high_mean"] == pytest.approx(2 / 7)  # row 0's 2 tokens
    assert metrics["clip_ratio/region_mean"] == pytest.approx(4 / 7)
    assert metrics["ratio/mean"] == pytest.approx((2 * 1.5 + 2 * 0.5 + 3 * 2.0) / 7)


def test_sequence_level_delta_caps_the_sequence_ratio():
    # delta = 1.4: row 2 (A = -1, r = 2) -> -min(1.4 * -1, 1.2 * -1) = 1.4 per token: 4.2 instead of 6.0
    logps, old_logps, advantages, mask = _sequence_case()
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="bnpo",
                        importance_sampling_level="sequence", delta=1.4)
    assert loss.item() == pytest.approx((6.8 - 1.8) / 7)


def test_sequence_level_gradient_reaches_every_token_of_an_unclipped_sequence():
    # Row 2 of the case above with the band wide open: its 3 tokens each lose -A * r, and
    # d r / d logps_t = r / 3, so d loss / d logps_t = 3 * (-A) * (r / 3) / 7 = -A * r / 7 = 2 / 7
    logps, old_logps, advantages, mask = _sequence_case()
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="bnpo",
                        importance_sampling_level="sequence", epsilon=0.99, epsilon_high=10.0)
    loss.backward()
    torch.testing.assert_close(logps.grad[2], torch.full((3,), 2.0 / 7, dtype=F64))
    assert logps.grad[3].abs().sum() == 0  # fully masked row
    assert logps.grad[0, 2] == 0 and logps.grad[1, 2] == 0  # padding


# --- KL term and importance-sampling weights ---------------------------------------------------
#
# k3(d) = exp(d) - d - 1 with d = ref - logps:
#   d = ln 2 -> 2 - ln 2 - 1 = 1 - ln 2;   d = 0 -> 0;   d = -ln 2 -> 1/2 + ln 2 - 1 = ln 2 - 1/2
# so the three k3 sum to exactly 1/2. With old_logps = None, r = 1 and the policy term is -A per token.

def _kl_case():
    logps = torch.tensor([[-0.3, -1.2, -2.0, 0.0]], dtype=F64, requires_grad=True)
    d = torch.tensor([[math.log(2), 0.0, -math.log(2), 0.0]], dtype=F64)
    ref_logps = logps.detach() + d
    ref_logps[0, 3] = float("nan")  # padding may hold anything
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    return logps, ref_logps, torch.tensor([1.0], dtype=F64), mask


def test_beta_adds_the_k3_kl_per_token_and_reports_it():
    logps, ref_logps, advantages, mask = _kl_case()
    loss, metrics = grpo_loss(logps, None, ref_logps, advantages, mask, loss_type="bnpo", beta=0.1)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * 0.5 / 3)  # mean over 3 tokens of (-A + beta * k3)
    assert metrics["kl"] == pytest.approx(0.5 / 3)


def test_is_weights_scale_the_policy_term_but_not_the_kl_term():
    logps, ref_logps, advantages, mask = _kl_case()
    loss, _ = grpo_loss(logps, None, ref_logps, advantages, mask, loss_type="bnpo", beta=0.1,
                        importance_sampling_ratio=torch.tensor([0.5], dtype=F64))
    assert loss.item() == pytest.approx(-0.5 + 0.1 * 0.5 / 3)


def test_beta_without_ref_logps_is_a_clear_error():
    logps, _, advantages, mask = _kl_case()
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, advantages, mask, beta=0.04)


def test_is_weights_per_sequence():
    # token case with weights [3, 0.5]: row 0 -1.7 * 3 = -5.1, row 1 6.8 * 0.5 = 3.4 -> -1.7 over 5 tokens
    logps, old_logps, advantages, mask = _token_case()
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dapo",
                        importance_sampling_ratio=torch.tensor([3.0, 0.5], dtype=F64))
    assert loss.item() == pytest.approx(-1.7 / 5)


def test_is_weights_per_token():
    # token case with weights [[1, 2, NaN (padding)], [0.5, 1, 2]]:
    # row 0: -1.2 * 1 - 0.5 * 2 = -2.2; row 1: 1.6 * 0.5 + 3.0 * 1 + 2.2 * 2 = 8.2 -> 6.0 over 5 tokens
    logps, old_logps, advantages, mask = _token_case()
    weights = torch.tensor([[1.0, 2.0, float("nan")], [0.5, 1.0, 2.0]], dtype=F64)
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dapo", importance_sampling_ratio=weights)
    assert loss.item() == pytest.approx(6.0 / 5)
    loss.backward()
    assert torch.isfinite(logps.grad).all()


# --- masking -----------------------------------------------------------------------------------

def _with_empty_row(logps, old_logps, advantages, mask):
    """The token case plus a third, fully masked row full of garbage."""
    garbage = torch.tensor([[float("nan"), 5.0, -3.0]], dtype=F64)
    logps = torch.cat([logps.detach(), garbage]).requires_grad_()
    old_logps = torch.cat([old_logps, torch.tensor([[float("-inf"), 0.0, 40.0]], dtype=F64)])
    advantages = torch.cat([advantages, torch.tensor([7.0], dtype=F64)])
    mask = torch.cat([mask, torch.zeros(1, 3, dtype=F64)])
    return logps, old_logps, advantages, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_fully_masked_row_contributes_nothing(loss_type):
    logps, old_logps, advantages, mask = _with_empty_row(*_token_case())
    loss, metrics = grpo_loss(logps, old_logps, None, advantages, mask, loss_type=loss_type, max_completion_length=4)
    # the sums are unchanged; grpo and dr_grpo still count the row in B, as TRL does
    expected = {"grpo": (-1.7 / 2 + 6.8 / 3) / 3, "bnpo": 5.1 / 5, "dr_grpo": 5.1 / (3 * 4), "dapo": 5.1 / 5}
    assert loss.item() == pytest.approx(expected[loss_type])
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[2].abs().sum() == 0


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_fully_masked_batch_gives_zero_loss_and_zero_gradients(loss_type, level):
    logps = torch.tensor([[-0.5, float("nan")], [-2.0, 0.0]], dtype=F64, requires_grad=True)
    old_logps = torch.tensor([[float("-inf"), -1.0], [3.0, -50.0]], dtype=F64)
    ref_logps = torch.tensor([[float("nan"), 60.0], [-1.0, float("inf")]], dtype=F64)
    mask = torch.zeros(2, 2, dtype=F64)
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, torch.tensor([1.0, -1.0], dtype=F64), mask,
                              loss_type=loss_type, importance_sampling_level=level, beta=0.1,
                              max_completion_length=2, importance_sampling_ratio=torch.tensor([2.0, 0.5], dtype=F64))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))
    assert all(math.isfinite(v) for v in metrics.values())


def test_bool_mask_is_the_same_as_float_mask():
    logps, old_logps, advantages, mask = _token_case()
    a, _ = grpo_loss(logps, old_logps, None, advantages, mask.bool(), loss_type="grpo")
    b, _ = grpo_loss(logps, old_logps, None, advantages, mask, loss_type="grpo")
    assert a.item() == b.item() == pytest.approx(TOKEN_EXPECTED["grpo"])


# --- old_logps=None: one update per generation -------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_without_old_logps_ratio_is_one_and_gradient_is_minus_advantage_over_normaliser(loss_type, level):
    # r = exp(logps - logps.detach()) = 1 and d r / d logps = 1, so d loss / d logps_t = -A_i * mask_t / N
    # with N the loss type's normaliser. At sequence level d r_i / d logps_t = 1 / n_i, but all n_i
    # tokens of the sequence carry r_i, so the sum is the same. Fresh random values: holds for any.
    B, T, L = 3, 5, 6
    logps = (-3 * torch.rand(B, T, dtype=F64)).requires_grad_()
    advantages = torch.randn(B, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=F64)
    loss, metrics = grpo_loss(logps, None, None, advantages, mask, loss_type=loss_type,
                              importance_sampling_level=level, max_completion_length=L)
    loss.backward()
    lengths = torch.tensor([5.0, 2.0, 1.0], dtype=F64)  # the empty row's count is clamped to 1
    normaliser = {"grpo": B * lengths.unsqueeze(1), "bnpo": 7.0, "dr_grpo": B * L, "dapo": 7.0}[loss_type]
    torch.testing.assert_close(logps.grad, -advantages.unsqueeze(1) * mask / normaliser)
    assert metrics["ratio/mean"] == 1.0 and metrics["clip_ratio/region_mean"] == 0.0
    expected_loss = (-advantages.unsqueeze(1) * mask / normaliser).sum()
    assert loss.item() == pytest.approx(expected_loss.item())


# --- gradients against finite differences ------------------------------------------------------
#
# Log-ratios are placed away from the kinks of min/clip: ln(1 - 0.2) = -0.223, ln(1 + 0.28) = 0.247,
# ln(delta = 1.8) = 0.588. Sequence means: row 0 -0.0625 (inside), row 1 0.633 (above delta),
# row 2 -0.35 (below), row 3 0.1625 (inside).
GRAD_LOG_RATIOS = [[-0.6, -0.1, 0.05, 0.4], [0.8, 0.4, 0.7, 0.3], [-0.6, -0.1, 0.4, 0.8], [0.3, 0.4, -0.1, 0.05]]
GRAD_MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
GRAD_ADVANTAGES = [0.7, -1.3, -0.4, 1.1]
KINKS = [math.log(0.8), math.log(1.28), math.log(1.8)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_finite_differences(loss_type, level):
    log_ratios = torch.tensor(GRAD_LOG_RATIOS, dtype=F64)
    mask = torch.tensor(GRAD_MASK, dtype=F64)
    effective = log_ratios if level == "token" else ((log_ratios * mask).sum(-1) / mask.sum(-1)).unsqueeze(1)
    for kink in KINKS:  # the test only means something if finite differences do not straddle a kink
        assert ((effective - kink).abs() > 1e-2).all()
    generator = torch.Generator().manual_seed(0)
    logps = (-3 * torch.rand(4, 4, generator=generator, dtype=F64)).requires_grad_()
    old_logps = logps.detach() - log_ratios
    ref_logps = logps.detach() + 0.3 * torch.randn(4, 4, generator=generator, dtype=F64)
    importance_sampling_ratio = 0.5 + torch.rand(4, 4, generator=generator, dtype=F64)
    advantages = torch.tensor(GRAD_ADVANTAGES, dtype=F64)

    def loss_of(lp):
        return grpo_loss(lp, old_logps, ref_logps, advantages, mask, loss_type=loss_type, epsilon=0.2,
                         epsilon_high=0.28, delta=1.8, beta=0.04, importance_sampling_level=level,
                         max_completion_length=4, num_items_in_batch=20,
                         importance_sampling_ratio=importance_sampling_ratio)[0]

    assert torch.autograd.gradcheck(loss_of, (logps,), eps=1e-6, atol=1e-8)


# --- input errors ------------------------------------------------------------------------------

def test_dr_grpo_needs_max_completion_length():
    logps, old_logps, advantages, mask = _token_case()
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dr_grpo")


@pytest.mark.parametrize("kwargs, match", [({"loss_type": "ppo"}, "loss_type"),
                                           ({"importance_sampling_level": "tokens"}, "importance_sampling_level")])
def test_unknown_options_are_named(kwargs, match):
    logps, old_logps, advantages, mask = _token_case()
    with pytest.raises(ValueError, match=match):
        grpo_loss(logps, old_logps, None, advantages, mask, **kwargs)


def test_mismatched_shapes_are_named():
    logps, old_logps, advantages, mask = _token_case()
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, old_logps, None, advantages.unsqueeze(1), mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logps, old_logps, None, advantages, mask[:, :2])


# --- selective_log_softmax and entropy_from_logits ---------------------------------------------

def test_selective_log_softmax_by_hand():
    # softmax of [ln 3, 0] is [3/4, 1/4]
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, math.log(3)]]])  # [1, 2, 2]
    index = torch.tensor([[0, 0]])
    torch.testing.assert_close(selective_log_softmax(logits, index),
                               torch.tensor([[math.log(0.75), math.log(0.25)]]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_selective_log_softmax_matches_log_softmax_gather(dtype, tol):
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 3, 50, generator=generator)).to(dtype)
    index = torch.randint(0, 50, (2, 3), generator=generator)
    got = selective_log_softmax(logits, index)
    assert got.dtype == dtype and got.shape == (2, 3)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_entropy_from_logits_by_hand():
    # uniform over 5 -> ln 5; [3/4, 1/4] -> -(3/4 ln 3/4 + 1/4 ln 1/4)
    uniform = torch.zeros(5)
    skewed = torch.tensor([math.log(3), 0.0, -1e4, -1e4, -1e4])  # the -1e4 entries have probability ~0
    logits = torch.stack([uniform, skewed]).reshape(1, 2, 5)  # [1, 2, 5]
    expected = torch.tensor([[math.log(5), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]])
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=1), expected)
    torch.testing.assert_close(entropy_from_logits(logits.bfloat16()), expected, atol=1e-2, rtol=1e-2)
