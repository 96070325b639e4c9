"""Group-relative advantages: each completion's reward against the other completions of its prompt.

    advantages, stats = compute_advantages(totals, num_generations=8, scale_rewards="group")

Completions of one prompt are consecutive: rows [k*G, (k+1)*G) are prompt k's G generations.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the std before dividing, as TRL does: a near-constant group is not blown up
ZERO_STD_TOL = 1e-8  # a group whose std is at most this gives no learning signal (TRL: isclose(std, 0))


def compute_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str, *,
                       valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """rewards [N] (weighted totals) -> advantages [N] and TRL's reward stats.

    A = r - mean of its group, then divided by (std + 1e-4): the group's std with scale_rewards="group",
    the whole batch's with "batch", nothing with "none". Stds are unbiased (torch.std), as in TRL.

    valid [N] (bool): False for completions no reward applied to; a NaN reward means the same.
    They are left out of their group's mean and std and get A = 0. A group whose valid rewards are
    all equal (or that has fewer than two) carries no signal: its advantages are exactly 0, whatever
    the rounding of r - mean, and it is counted in frac_reward_zero_std.

    Stats: reward (mean of valid rewards; NaN if there are none), reward_std (mean of the group stds;
    the batch std with scale_rewards="batch", which is what TRL logs), frac_reward_zero_std (fraction
    of groups with no signal).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], one total per completion; got shape {tuple(rewards.shape)}")
    N = rewards.shape[0]
    if num_generations < 1 or N == 0 or N % num_generations:
        raise ValueError(f"{N} rewards do not split into groups of num_generations={num_generations}: "
                         "each prompt must contribute exactly num_generations consecutive completions")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    if torch.isinf(rewards).any():
        row = int(torch.isinf(rewards).nonzero()[0])
        raise ValueError(f"reward of completion {row} is {rewards[row].item()}; rewards must be finite "
                         "(NaN marks a completion no reward applied to)")
    if valid is None:
        valid = torch.ones(N, dtype=torch.bool, device=rewards.device)
    elif valid.shape != (N,):
        raise ValueError(f"valid must be [N] = [{N}]; got shape {tuple(valid.shape)}")
    valid = valid.bool() & ~torch.isnan(rewards)  # [N]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32

    # float64 so that a group of equal float32 rewards has r - mean of ~1e-17, far below ZERO_STD_TOL
    num_groups = N // num_generations
    r = torch.where(valid, rewards.double(), 0.0).view(num_groups, num_generations)  # [P, G]
    v = valid.view(num_groups, num_generations)  # [P, G]
    count = v.sum(1)  # [P]
    mean = r.sum(1) / count.clamp(min=1)  # [P]
    centred = torch.where(v, r - mean.unsqueeze(1), 0.0)  # [P, G]; 0 for invalid completions
    group_std = (centred.pow(2).sum(1) / (count - 1).clamp(min=1)).sqrt()  # [P]; 0 with < 2 valid
    zero_std = group_std <= ZERO_STD_TOL  # [P]

    n_valid = int(valid.sum())
    r_valid = rewards.double()[valid]  # [n_valid]
    batch_std = r_valid.std().item() if n_valid > 1 else 0.0

    if scale_rewards == "group":
        advantages = centred / (group_std.unsqueeze(1) + STD_EPS)  # [P, G]
    elif scale_rewards == "batch":
        advantages = centred / (batch_std + STD_EPS)  # [P, G]
    else:
        advantages = centred  # [P, G]
    advantages = torch.where(zero_std.unsqueeze(1), 0.0, advantages)  # [P, G]
    advantages = advantages.reshape(N).to(out_dtype)  # [N]

    stats = {
        "reward": r_valid.mean().item() if n_valid else float("nan"),
        "reward_std": batch_std if scale_rewards == "batch" else group_std.mean().item(),
        "frac_reward_zero_std": zero_std.double().mean().item(),
    }
    return advantages, stats
