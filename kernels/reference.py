"""Plain-torch references: the ground truth every fused kernel in kernels/ is tested against.

    logps = selective_log_softmax(logits, completion_ids)            # [B, T]
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, loss_type="dapo")
    keep = high_entropy_mask(entropy, completion_mask, 0.2)   # top_entropy_quantile: entropy_mask=keep

Written for clarity, not speed: one formula per line, in the order of the papers and of TRL's
GRPOTrainer._compute_loss, so that a fused kernel which disagrees is the one that is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# divided by num_items_in_batch (the tokens of the whole generation); the others are micro-batch means
GENERATION_NORMALISED = ("dapo", "cispo")


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without keeping a second [B, T, V] tensor alive.

    logits [B, T, V], index [B, T] -> [B, T], in the dtype of logits.
    """
    if logits.dtype in (torch.float32, torch.float64):
        # log_softmax(x)_i = x_i - logsumexp(x); logsumexp one row at a time bounds the temporary to [T, V]
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)  # [B, T]
        logsumexp = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # [B, T]
        return selected - logsumexp
    # bf16/fp16: x_i - logsumexp(x) loses the small differences that matter (both terms are large
    # and rounded to 8 bits of mantissa), so take log_softmax per row, as TRL does
    rows = []
    for row_logits, row_index in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)  # [T, V]
        rows.append(row_logps.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))  # [T]
    return torch.stack(rows)  # [B, T]


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy of the softmax at each position: logits [..., V] -> [...], float32 (or float64).

    Positions go through in chunks so the float32 copy of the logits is [chunk_size, V] at most.
    """
    vocab = logits.shape[-1]
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    # One leading row at a time: reshaping a sliced (non-contiguous) [B, T, V] to [B*T, V] would
    # copy all of it first.
    rows = logits.unbind(0) if logits.dim() == 3 else [logits.reshape(-1, vocab)]
    chunks = []
    for row in rows:
        for chunk in row.split(chunk_size, dim=0):
            logps = F.log_softmax(chunk.to(out_dtype), dim=-1)  # [chunk, V]
            chunks.append(-(logps.exp() * logps).sum(-1))  # [chunk]
    return torch.cat(chunks).reshape(logits.shape[:-1])


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The tokens whose entropy is in the top `top_entropy_quantile` of the batch's (Wang et al., "Beyond
    the 80/20 rule"): the policy term trains on them only. entropies, mask [B, T] -> bool [B, T].

        threshold = quantile(entropies of the tokens in mask, 1 - top_entropy_quantile)  # linear interpolation
        keep      = mask & (entropies >= threshold)

    1.0 keeps every token (threshold = the smallest entropy); 0.0 keeps the highest-entropy token(s).
    gather: takes this process's [n] entropies and returns every process's, concatenated, so that all
    processes use one threshold (as TRL does); None: this batch alone.
    """
    active = mask.bool()  # [B, T]
    values = entropies[active].float()  # [n]
    if gather is not None:
        values = gather(values)  # [n over all processes]
    if values.numel() == 0:
        return torch.zeros_like(active)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)  # scalar
    return active & (torch.where(active, entropies, 0.0) >= threshold)  # [B, T]


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO surrogate, or CISPO's or SAPO's (+ beta * k3 KL), normalised as `loss_type` says.

    logps      [B, T]  log p(token) under the policy being trained (the only input with a gradient)
    old_logps  [B, T]  under the policy that sampled; None: the policy has not moved since sampling
                       (one update per generation), so the ratio is 1 but its gradient still flows
    ref_logps  [B, T]  under the reference model; needed only when beta > 0
    advantages [B]     one per completion
    mask       [B, T]  1 for completion tokens that count, 0 for padding (and masked completions)
    importance_sampling_ratio [B, T] or [B]: truncated importance-sampling weights for rollouts from another engine,
                       min(exp(old_logps - sampler_logps), cap), computed by the caller. Constants: they
                       scale the policy term only, not the KL term, as in TRL.
    entropy_mask [B, T] bool: the tokens the policy term keeps (high_entropy_mask's, for
                       top_entropy_quantile < 1); the KL term keeps every token, as in TRL.

    r = exp(logps - old_logps), or for importance_sampling_level="sequence" (GSPO) one r per sequence:
    exp(masked mean over its tokens of logps - old_logps), the same for all its tokens. Per token,
    policy term + beta * k3, the policy term by loss_type:

      grpo, bnpo, dr_grpo, dapo  -min(min(r, delta) * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)
      cispo  -sg(min(r, epsilon_high)) * A * logps     (MiniMax-M1; sg = stop-gradient. The clipped ratio
             only weights the log-prob, so every token keeps a gradient, -sg(min(r, eps_high)) * A.
             epsilon_high is the cap itself here (ScaleRL's eps_max, 5.0 there), not 1 + a margin)
      sapo   -(4 / tau) * sigmoid(tau * (r - 1)) * A,  tau = sapo_temperature_pos if A > 0 else _neg
             (Soft Adaptive Policy Optimization: a smooth gate instead of the clip. The gradient is
             -A * 4 s (1 - s) * r with s = sigmoid(tau * (r - 1)): -A at r = 1, fading as r leaves 1)

    Normalisation of the masked sum:
      grpo, sapo    per sequence / its token count, then the mean over the B sequences (empty ones count, as 0)
      bnpo          / tokens in this batch
      dr_grpo       / (B * max_completion_length)
      dapo, cispo   / num_items_in_batch: tokens in the whole generation batch (all micro-batches, all
                    processes), so micro-batch losses add up to the generation's token mean. Defaults
                    to this batch's tokens. Under DDP, whose all-reduce averages gradients, pass it
                    divided by the world size.

    Metrics (floats, over active tokens; a sequence-level r counts once per token of its sequence):
      clip_ratio/low_mean     r < 1 - epsilon and A < 0 (the clip removed the gradient of a negative A)
      clip_ratio/high_mean    r > 1 + epsilon_high and A > 0
      clip_ratio/region_mean  either                       (these three for the clipped loss types)
      cispo_clip_ratio        r > epsilon_high and A > 0   (cispo; sapo has no clip)
      ratio/mean              mean r
      kl                      mean k3, when beta > 0
    """
    _check_inputs(logps, old_logps, ref_logps, advantages, mask, loss_type, importance_sampling_level, beta,
                  max_completion_length, importance_sampling_ratio, entropy_mask)
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    # exp of a log-prob difference in bf16 has ~2 significant digits: compute in float32 at least
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(dtype)
    old_logps = logps.detach() if old_logps is None else old_logps.to(dtype)
    advantages = advantages.to(dtype).unsqueeze(1)  # [B, 1]
    active = mask.bool()  # [B, T]
    mask = mask.to(dtype)  # [B, T]
    token_count = mask.sum().clamp(min=1.0)  # scalar; 1 for an empty batch, so 0 / 1 = 0, never NaN

    # Differences of log-probs are zeroed at padding *before* exp: padding may hold anything (-inf,
    # NaN) and masking after exp would give 0 * inf = NaN in the value or the gradient.
    log_ratio = torch.where(active, logps - old_logps, 0.0)  # [B, T]
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio  # [B, T]
    else:
        # GSPO: the length-normalised sequence log-ratio; written as a mean of per-token terms so
        # that each token's logp still gets its own gradient, 1 / |y_i| of the sequence's
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        log_importance_weights = log_importance_weights.unsqueeze(-1)  # [B, 1], broadcast over T below
    ratio = torch.exp(log_importance_weights)  # [B, T] or [B, 1]

    if loss_type == "cispo":
        cispo_weight = torch.clamp(ratio, max=epsilon_high).detach()  # [B, T] or [B, 1]
        # logps themselves, not a ratio: zeroed at padding, which may hold -inf
        per_token_loss = -cispo_weight * advantages * torch.where(active, logps, 0.0)  # [B, T]
    elif loss_type == "sapo":
        tau = torch.full_like(advantages, sapo_temperature_neg).masked_fill(advantages > 0, sapo_temperature_pos)  # [B, 1]
        gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau  # [B, T] or [B, 1]; r at r = 1, slope 1 there
        per_token_loss = -gate * advantages  # [B, T] or [B, 1]
    else:
        clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [B, T] or [B, 1]
        # Two-sided clipping (delta): with A < 0 the min picks the unclipped branch when r is large,
        # which is unbounded; delta caps it
        capped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)  # [B, T] or [B, 1]
        per_token_loss = -torch.min(capped_ratio * advantages, clipped_ratio * advantages)  # [B, T] or [B, 1]
    per_token_loss = per_token_loss.expand_as(mask)  # [B, T]
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(dtype)  # [B, T]

    if importance_sampling_ratio is not None:
        importance_sampling_ratio = importance_sampling_ratio.to(dtype)
        if importance_sampling_ratio.dim() == 1:
            importance_sampling_ratio = importance_sampling_ratio.unsqueeze(1)  # [B, 1]
        importance_sampling_ratio = torch.where(active, importance_sampling_ratio, 0.0)  # [B, T]; padding may hold NaN
        per_token_loss = per_token_loss * importance_sampling_ratio  # [B, T]

    per_token_kl = None
    if beta != 0.0:
        ref_log_ratio = torch.where(active, ref_logps.to(dtype) - logps, 0.0)  # [B, T]
        # k3 estimator of KL(policy || ref): unbiased, always >= 0 (Schulman, "Approximating KL divergence")
        per_token_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1  # [B, T]
        per_token_loss = per_token_loss + beta * per_token_kl  # [B, T]

    masked_loss = per_token_loss * mask  # [B, T]
    if loss_type in ("grpo", "sapo"):
        loss = (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_loss.sum() / token_count
    elif loss_type == "dr_grpo":
        loss = masked_loss.sum() / (mask.shape[0] * max_completion_length)
    else:  # dapo, cispo
        if num_items_in_batch is None:
            num_items_in_batch = token_count
        normaliser = torch.as_tensor(num_items_in_batch, dtype=dtype, device=mask.device).clamp(min=1.0)
        loss = masked_loss.sum() / normaliser

    with torch.no_grad():
        ratio = ratio.expand_as(mask)  # [B, T]: metrics count tokens, at both levels

        def masked_mean(x: torch.Tensor) -> float:
            return ((x.to(dtype) * mask).sum() / token_count).item()

        metrics = {}
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_mean((ratio > epsilon_high) & (advantages > 0))
        elif loss_type != "sapo":
            is_low_clipped = (ratio < 1 - epsilon_low) & (advantages < 0)  # [B, T]
            is_high_clipped = (ratio > 1 + epsilon_high) & (advantages > 0)  # [B, T]
            metrics["clip_ratio/low_mean"] = masked_mean(is_low_clipped)
            metrics["clip_ratio/high_mean"] = masked_mean(is_high_clipped)
            metrics["clip_ratio/region_mean"] = masked_mean(is_low_clipped | is_high_clipped)
        metrics["ratio/mean"] = masked_mean(ratio)
        if per_token_kl is not None:
            metrics["kl"] = masked_mean(per_token_kl)
    return loss, metrics


def _check_inputs(logps, old_logps, ref_logps, advantages, mask, loss_type, importance_sampling_level, beta,
                  max_completion_length, importance_sampling_ratio, entropy_mask=None) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} is not one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}")
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, T]; got shape {tuple(logps.shape)}")
    B, T = logps.shape
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask),
                         ("entropy_mask", entropy_mask)):
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; logps has {(B, T)}, they must match")
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be [B] = [{B}], one per completion; got shape {tuple(advantages.shape)}")
    if importance_sampling_ratio is not None and importance_sampling_ratio.shape not in ((B,), (B, T)):
        raise ValueError(f"importance_sampling_ratio must be [B] or [B, T] = [{B}] or [{B}, {T}]; "
                         f"got {tuple(importance_sampling_ratio.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} adds a KL term to the reference model, which needs ref_logps; "
                         "pass them, or set beta=0")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' divides by B * max_completion_length; pass max_completion_length")
