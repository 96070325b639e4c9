"""grpoflow/advantages.py: group-relative advantages against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grpoflow.advantages import compute_advantages

# Two prompts, G = 3.
#   group 0: [1, 2, 3] mean 2, deviations [-1, 0, 1], unbiased std sqrt(2 / 2) = 1
#   group 1: [0, 0, 3] mean 1, deviations [-1, -1, 2], unbiased std sqrt(6 / 2) = sqrt(3)
#   batch:   mean 9 / 6 = 1.5, squared deviations .25 + .25 + 2.25 + 2.25 + 2.25 + 2.25 = 9.5,
#            unbiased std sqrt(9.5 / 5) = sqrt(1.9)
REWARDS = [1.0, 2.0, 3.0, 0.0, 0.0, 3.0]
DEVIATIONS = [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]


def test_group_scaling_by_hand():
    advantages, stats = compute_advantages(torch.tensor(REWARDS), 3, "group")
    s0, s1 = 1.0 + 1e-4, math.sqrt(3) + 1e-4
    expected = torch.tensor([-1 / s0, 0.0, 1 / s0, -1 / s1, -1 / s1, 2 / s1])
    torch.testing.assert_close(advantages, expected)
    assert advantages.dtype == torch.float32
    assert stats["reward"] == pytest.approx(1.5)
    assert stats["reward_std"] == pytest.approx((1 + math.sqrt(3)) / 2)
    assert stats["frac_reward_zero_std"] == 0.0


def test_batch_scaling_divides_group_deviations_by_the_batch_std():
    advantages, stats = compute_advantages(torch.tensor(REWARDS), 3, "batch")
    torch.testing.assert_close(advantages, torch.tensor(DEVIATIONS) / (math.sqrt(1.9) + 1e-4))
    assert stats["reward_std"] == pytest.approx(math.sqrt(1.9))  # TRL logs the batch std here


def test_no_scaling_leaves_group_deviations():
    advantages, stats = compute_advantages(torch.tensor(REWARDS), 3, "none")
    torch.testing.assert_close(advantages, torch.tensor(DEVIATIONS))
    assert stats["reward_std"] == pytest.approx((1 + math.sqrt(3)) / 2)


@pytest.mark.parametrize("dtype, value", [(torch.float32, 0.7), (torch.float64, 0.1)])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_and_are_counted(scale_rewards, dtype, value):
    # Seven equal rewards whose mean does not round back to the value: float32 0.7 (float32 mean and
    # std off by ~6e-8) and float64 0.1 (mean off by ~1e-17). Divided by (std + 1e-4), that rounding
    # would leak a small nonzero "advantage" out of a group with no signal.
    # group 1: [1, 0, 0, 0, 0, 0, 0] mean 1/7, unbiased std sqrt((36/49 + 6/49) / 6) = sqrt(1/7)
    rewards = torch.tensor([value] * 7 + [1.0] + [0.0] * 6, dtype=dtype)
    advantages, stats = compute_advantages(rewards, 7, scale_rewards)
    assert advantages.dtype == dtype
    assert torch.equal(advantages[:7], torch.zeros(7, dtype=dtype))
    assert advantages[7] > 0 and (advantages[8:] < 0).all()
    assert stats["frac_reward_zero_std"] == 0.5
    assert stats["reward"] == pytest.approx((value * 7 + 1.0) / 14, rel=1e-6)
    if scale_rewards != "batch":
        assert stats["reward_std"] == pytest.approx(math.sqrt(1 / 7) / 2, rel=1e-6)


def test_invalid_completions_are_left_out_and_get_zero():
    # group 0: [1, (invalid), 3] -> valid mean 2, deviations [-1, 1], unbiased std sqrt(2 / 1) = sqrt(2)
    # group 1: [2, NaN, 2] -> NaN means invalid too; valid rewards equal -> no signal, counted
    # group 2: [(invalid), 5, (invalid)] -> a single valid reward has no group to compare with -> counted
    rewards = torch.tensor([1.0, 100.0, 3.0, 2.0, float("nan"), 2.0, -4.0, 5.0, 9.0])
    valid = torch.tensor([True, False, True, True, True, True, False, True, False])
    advantages, stats = compute_advantages(rewards, 3, "group", valid=valid)
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(advantages, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert stats["reward"] == pytest.approx((1 + 3 + 2 + 2 + 5) / 5)  # valid rewards only
    assert stats["reward_std"] == pytest.approx(math.sqrt(2) / 3)


def test_batch_std_uses_valid_rewards_only():
    # valid rewards [0, 2, 0, 2]: mean 1, unbiased std sqrt(4 / 3); group 0 = [0, (9), 2], group 1 = [0, 2, (-9)]
    rewards = torch.tensor([0.0, 9.0, 2.0, 0.0, 2.0, -9.0])
    valid = torch.tensor([True, False, True, True, True, False])
    advantages, stats = compute_advantages(rewards, 3, "batch", valid=valid)
    b = math.sqrt(4 / 3) + 1e-4
    torch.testing.assert_close(advantages, torch.tensor([-1 / b, 0.0, 1 / b, -1 / b, 1 / b, 0.0]))
    assert stats["reward_std"] == pytest.approx(math.sqrt(4 / 3))


def test_no_valid_completion_at_all():
    advantages, stats = compute_advantages(torch.tensor([0.0, 0.0]), 2, "group", valid=torch.tensor([False, False]))
    assert torch.equal(advantages, torch.zeros(2))
    assert stats["frac_reward_zero_std"] == 1.0 and math.isnan(stats["reward"])


def test_group_advantages_are_standardised():
    # fresh random rewards: in each group the advantages have mean 0 and unbiased std 1 (up to the 1e-4)
    rewards = torch.randn(8 * 16, dtype=torch.float64) * 3 + 1
    advantages, _ = compute_advantages(rewards, 16, "group")
    grouped = advantages.view(8, 16)  # [P, G]
    torch.testing.assert_close(grouped.mean(1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(grouped.std(1), torch.ones(8, dtype=torch.float64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("n, g", [(7, 3), (6, 0), (0, 3)])
def test_batch_not_made_of_whole_groups_is_a_clear_error(n, g):
    with pytest.raises(ValueError, match="num_generations"):
        compute_advantages(torch.zeros(n), g, "group")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="completion 2"):
        compute_advantages(torch.tensor([0.0, 1.0, float("inf"), 0.0]), 2, "group")
    with pytest.raises(ValueError, match="valid"):
        compute_advantages(torch.zeros(4), 2, "group", valid=torch.ones(3, dtype=torch.bool))
