"""Fused GRPO loss in Triton: kernels/reference.py's grpo_loss, value and gradient in one pass.

    loss, metrics = triton_grpo_loss(logps, old_logps, ref_logps, advantages, mask, loss_type="dapo")

Same signature, same numbers (tested against the reference for every loss_type,
importance_sampling_level, delta, beta, importance_sampling_ratio and entropy_mask). One program per sequence:

    sequence level: a first pass over the row sums the masked log-ratios, for the sequence's ratio
    then per token: the policy term (clipped surrogate, CISPO's or SAPO's; times importance_sampling_ratio,
              0 where entropy_mask drops the token) + beta * k3, its masked sum and the metric
              counts for the row, and d(masked per-token loss) / d logps written to [B, T]

The normalisation of each loss_type is a per-row scale (1 / (B * tokens of the row) for grpo, one
constant for the others), applied to the row sums in torch and to the saved per-token gradient in
the backward: the backward is one multiplication, no kernel. The per-token derivative mirrors
torch's autograd of the reference exactly, ties included: where the clipped and unclipped terms are
equal, torch.min passes half of the gradient to each (so inside the clip range the gradient is A * r).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpoflow.kernels.reference import _check_inputs
from grpoflow.kernels.triton_support import interpreting

_STATS = 7  # per row: loss sum, tokens, low-clipped, high-clipped, either, ratio sum, kl sum
_LOSS_KIND = {"cispo": 1, "sapo": 2}  # the kernel's LOSS; 0: the clipped surrogate of grpo, bnpo, dr_grpo, dapo


@triton.jit
def _grpo_loss_kernel(logps_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, isw_ptr, keep_ptr, grad_ptr, stats_ptr, T,
                      stride_isw_b, stride_isw_t, epsilon_low, epsilon_high, delta, beta, tau_pos, tau_neg,
                      LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, HAS_IS: tl.constexpr,
                      HAS_KEEP: tl.constexpr, HAS_DELTA: tl.constexpr, SEQUENCE: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    row = b.to(tl.int64) * T  # logps, old, ref, mask, keep and grad are contiguous [B, T]
    advantage = tl.load(adv_ptr + b).to(tl.float32)
    lo, hi = 1.0 - epsilon_low, 1.0 + epsilon_high
    negative = tl.where(advantage < 0, 1.0, 0.0)  # the clip metrics count by the advantage's sign
    positive = tl.where(advantage > 0, 1.0, 0.0)
    tau = tl.where(advantage > 0, tau_pos, tau_neg)  # sapo

    if SEQUENCE:
        # GSPO: one ratio per sequence, exp of the masked mean log-ratio; the policy term of every
        # token is then the same function of it, so the row's gradient needs sum(mask * weight)
        log_ratio_sum = 0.0
        tokens = 0.0
        weight_sum = 0.0
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            in_row = t < T
            m = tl.load(mask_ptr + row + t, mask=in_row, other=0.0)
            active = m != 0
            lp = tl.load(logps_ptr + row + t, mask=in_row, other=0.0).to(tl.float32)
            old = lp
            if HAS_OLD:
                old = tl.load(old_ptr + row + t, mask=in_row, other=0.0).to(tl.float32)
            log_ratio_sum += tl.sum(tl.where(active, (lp - old) * m, 0.0))
            tokens += tl.sum(m)
            weight_sum += tl.sum(_policy_weight(isw_ptr, keep_ptr, row, b, t, in_row, active, stride_isw_b,
                                                stride_isw_t, HAS_IS, HAS_KEEP) * m)
        seq_ratio = tl.exp(log_ratio_sum / tl.maximum(tokens, 1.0))
        seq_d_policy = _d_policy(seq_ratio, advantage, lo, hi, delta, tau, LOSS, HAS_DELTA)  # d policy / d ratio
        # d / d logp_t of the row's policy sum = weight_sum * seq_d_policy * ratio * mask_t / tokens
        # (cispo: its ratio is a constant weight, so no token's gradient goes through it)
        seq_grad = weight_sum * seq_d_policy * seq_ratio / tl.maximum(tokens, 1.0)

    loss_sum = 0.0
    token_sum = 0.0
    low_sum = 0.0
    high_sum = 0.0
    region_sum = 0.0
    ratio_sum = 0.0
    kl_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_row = t < T
        m = tl.load(mask_ptr + row + t, mask=in_row, other=0.0)  # float32 weights, 0 past T
        active = m != 0
        # log-probs and their differences are zeroed at padding before use: padding may hold -inf or NaN
        lp = tl.where(active, tl.load(logps_ptr + row + t, mask=in_row, other=0.0).to(tl.float32), 0.0)
        if SEQUENCE:
            ratio = tl.zeros((BLOCK_T,), dtype=tl.float32) + seq_ratio
        else:
            old = lp
            if HAS_OLD:
                old = tl.load(old_ptr + row + t, mask=in_row, other=0.0).to(tl.float32)
            ratio = tl.exp(tl.where(active, lp - old, 0.0))
        w = _policy_weight(isw_ptr, keep_ptr, row, b, t, in_row, active, stride_isw_b, stride_isw_t,
                           HAS_IS, HAS_KEEP)
        if LOSS == 1:  # cispo: -min(r, epsilon_high) * A * logp, the weight a constant
            cispo_weight = tl.minimum(ratio, epsilon_high)
            per_token = -cispo_weight * advantage * lp * w
            grad = -cispo_weight * advantage * w
        else:
            per_token = _policy(ratio, advantage, lo, hi, delta, tau, LOSS, HAS_DELTA) * w
            if SEQUENCE:
                grad = seq_grad + tl.zeros((BLOCK_T,), dtype=tl.float32)
            else:
                grad = w * _d_policy(ratio, advantage, lo, hi, delta, tau, LOSS, HAS_DELTA) * ratio
        if HAS_KL:
            # k3 = exp(ref - logp) - (ref - logp) - 1, d k3 / d logp = 1 - exp(ref - logp)
            ref = tl.load(ref_ptr + row + t, mask=in_row, other=0.0).to(tl.float32)
            ref_log_ratio = tl.where(active, ref - lp, 0.0)
            kl = tl.exp(ref_log_ratio) - ref_log_ratio - 1.0
            per_token += beta * kl
            grad += beta * (1.0 - tl.exp(ref_log_ratio))
            kl_sum += tl.sum(kl * m)
        tl.store(grad_ptr + row + t, tl.where(active, grad * m, 0.0), mask=in_row)
        loss_sum += tl.sum(per_token * m)
        token_sum += tl.sum(m)
        if LOSS == 1:  # cispo_clip_ratio, in the high slot
            high = tl.where(ratio > epsilon_high, positive, 0.0)
            low = tl.zeros((BLOCK_T,), dtype=tl.float32)
        else:
            low = tl.where(ratio < lo, negative, 0.0)
            high = tl.where(ratio > hi, positive, 0.0)
        low_sum += tl.sum(low * m)
        high_sum += tl.sum(high * m)
        region_sum += tl.sum(tl.maximum(low, high) * m)
        ratio_sum += tl.sum(ratio * m)
    stats = stats_ptr + b * 7
    tl.store(stats + 0, loss_sum)
    tl.store(stats + 1, token_sum)
    tl.store(stats + 2, low_sum)
    tl.store(stats + 3, high_sum)
    tl.store(stats + 4, region_sum)
    tl.store(stats + 5, ratio_sum)
    tl.store(stats + 6, kl_sum)


@triton.jit
def _policy_weight(isw_ptr, keep_ptr, row, b, t, in_row, active, stride_isw_b, stride_isw_t,
                   HAS_IS: tl.constexpr, HAS_KEEP: tl.constexpr):
    """What the policy term of each token is multiplied by: its importance-sampling weight, 0 where
    the entropy mask drops it; 0 at padding."""
    w = tl.where(active, 1.0, 0.0)
    if HAS_IS:
        isw = tl.load(isw_ptr + b * stride_isw_b + t * stride_isw_t, mask=in_row, other=0.0).to(tl.float32)
        w = tl.where(active, isw, 0.0)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row + t, mask=in_row, other=0.0)
        w = tl.where(keep != 0, w, 0.0)
    return w


@triton.jit
def _policy(ratio, advantage, lo, hi, delta, tau, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """The policy term of a token as a function of its ratio: the clipped surrogate, or sapo's gate."""
    if LOSS == 2:  # sapo: -(4 / tau) sigmoid(tau (r - 1)) A
        policy = -(4.0 / tau) * tl.sigmoid(tau * (ratio - 1.0)) * advantage
    else:
        capped = ratio
        if HAS_DELTA:
            capped = tl.minimum(ratio, delta)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        policy = -tl.minimum(capped * advantage, clipped * advantage)
    return policy


@triton.jit
def _d_policy(ratio, advantage, lo, hi, delta, tau, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """d/d ratio of _policy (cispo: 0, its ratio is a constant). The clipped surrogate's as torch's autograd
    takes it: clamp passes the gradient on its closed range, min splits it in half on a tie."""
    if LOSS == 1:
        d_policy = tl.zeros_like(ratio)
    elif LOSS == 2:  # d/dr (4 / tau) sigmoid(tau (r - 1)) = 4 s (1 - s)
        s = tl.sigmoid(tau * (ratio - 1.0))
        d_policy = -advantage * 4.0 * s * (1.0 - s)
    else:
        d_capped = tl.zeros_like(ratio) + 1.0
        capped = ratio
        if HAS_DELTA:
            d_capped = tl.where(ratio <= delta, 1.0, 0.0)
            capped = tl.minimum(ratio, delta)
        d_clipped = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        a, c = capped * advantage, clipped * advantage
        d_min = tl.where(a < c, d_capped, tl.where(a > c, d_clipped, 0.5 * (d_capped + d_clipped)))
        d_policy = -advantage * d_min
    return d_policy


class TritonGRPOLoss(torch.autograd.Function):
    """loss = sum over rows of row_scale[b] * (masked per-token loss of row b); only logps gets a gradient."""

    @staticmethod
    def forward(ctx, logps, row_sums, row_scale, token_grad):
        ctx.save_for_backward(row_scale, token_grad)
        ctx.logps_dtype = logps.dtype
        return (row_sums * row_scale).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        row_scale, token_grad = ctx.saved_tensors
        grad = token_grad * (row_scale * grad_loss)[:, None]  # [B, T]
        return grad.to(ctx.logps_dtype), None, None, None


def triton_grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                     advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", epsilon: float = 0.2,
                     epsilon_high: float | None = None, delta: float | None = None, beta: float = 0.0,
                     importance_sampling_level: str = "token", max_completion_length: int | None = None,
                     num_items_in_batch: int | float | torch.Tensor | None = None,
                     importance_sampling_ratio: torch.Tensor | None = None, sapo_temperature_pos: float = 1.0,
                     sapo_temperature_neg: float = 1.05, entropy_mask: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """kernels/reference.py's grpo_loss (see it for the arguments and metrics), fused. float32."""
    _check_inputs(logps, old_logps, ref_logps, advantages, mask, loss_type, importance_sampling_level, beta,
                  max_completion_length, importance_sampling_ratio, entropy_mask)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    B, T = logps.shape
    f32 = dict(dtype=torch.float32, device=logps.device)
    mask_f = mask.to(torch.float32).contiguous()  # [B, T]
    token_grad = torch.empty(B, T, **f32)  # d(masked per-token loss) / d logps, before normalisation
    stats = torch.empty(B, _STATS, **f32)
    if importance_sampling_ratio is not None:
        isw = importance_sampling_ratio.contiguous()
        isw_strides = (isw.stride(0), isw.stride(1) if isw.dim() == 2 else 0)  # [B] broadcasts over T
    else:
        isw, isw_strides = mask_f, (0, 0)
    keep = entropy_mask.to(torch.float32).contiguous() if entropy_mask is not None else mask_f  # [B, T]
    if B > 0 and T > 0:
        block_t = 16 if interpreting() else min(1024, triton.next_power_of_2(T))
        _grpo_loss_kernel[(B,)](
            logps.detach().contiguous(), old_logps.contiguous() if old_logps is not None else mask_f,
            ref_logps.contiguous() if beta != 0.0 else mask_f, advantages.contiguous(), mask_f, isw, keep, token_grad,
            stats, T, *isw_strides, float(epsilon), float(epsilon_high), float(delta or 0.0), float(beta),
            float(sapo_temperature_pos), float(sapo_temperature_neg), LOSS=_LOSS_KIND.get(loss_type, 0),
            HAS_OLD=old_logps is not None, HAS_KL=beta != 0.0, HAS_IS=importance_sampling_ratio is not None,
            HAS_KEEP=entropy_mask is not None,
            HAS_DELTA=delta is not None, SEQUENCE=importance_sampling_level == "sequence", BLOCK_T=block_t,
            num_warps=4)
    else:
        stats.zero_()
    row_sums, row_tokens = stats[:, 0], stats[:, 1]  # [B]
    token_count = row_tokens.sum().clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        row_scale = 1.0 / (B * row_tokens.clamp(min=1.0))  # [B]
    elif loss_type == "bnpo":
        row_scale = (1.0 / token_count).expand(B)
    elif loss_type == "dr_grpo":
        row_scale = torch.full((B,), 1.0 / (B * max_completion_length), **f32)
    else:  # dapo, cispo
        normaliser = token_count if num_items_in_batch is None else num_items_in_batch
        normaliser = torch.as_tensor(normaliser, **f32).clamp(min=1.0)
        row_scale = (1.0 / normaliser).expand(B)
    loss = TritonGRPOLoss.apply(logps, row_sums, row_scale.contiguous(), token_grad)

    totals = (stats[:, 2:].sum(0) / token_count).tolist()  # one transfer for all the metrics
    if loss_type == "cispo":
        metrics = {"cispo_clip_ratio": totals[1]}
    elif loss_type == "sapo":
        metrics = {}
    else:
        metrics = {"clip_ratio/low_mean": totals[0], "clip_ratio/high_mean": totals[1],
                   "clip_ratio/region_mean": totals[2]}
    metrics["ratio/mean"] = totals[3]
    if beta != 0.0:
        metrics["kl"] = totals[4]
    return loss, metrics
