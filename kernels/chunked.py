"""Log-probs of chosen tokens straight from hidden states, never holding the [N, V] logits.

    logps, entropy = chunked_selective_logps(hidden, lm_head.weight, targets, temperature=0.7)

The plain path (kernels/reference.py) makes logits = hidden @ W.T for every position, keeps them
for the backward and log-softmaxes them: [N, V] twice, the largest tensors of a GRPO step
(32 completions x 256 tokens x 49,152 = 0.8 GB in bf16 for SmolLM2; 5 GB for one 20K-token
completion with Llama 3's 128,256-token vocabulary). Here the rows go through in chunks of `chunk_rows`:

    forward:  per chunk, logits [c, V] in float32 -> logsumexp, log p(target), entropy; only
              the logsumexp [N] is kept
    backward: per chunk, the logits are made again and
              d_logits = g * (onehot(target) - softmax) / temperature         # [c, V]
              d_hidden = d_logits @ W ;  d_W += d_logits.T @ hidden          # only if W is trained

so the peak is one chunk's [c, V] float32 logits and their softmax. This is the pure-torch path
that runs everywhere (issue #7 adds the Triton one and tests it against the same reference).
Matmuls run in `compute_dtype` (what autocast would have used); everything after in float32
(float64 when the inputs are).
"""

from __future__ import annotations

import torch

# rows per chunk: the [rows, V] float32 logits and their softmax stay near this many bytes each
CHUNK_BYTES = 64 * 2**20


def chunk_rows_for(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(compute_dtype, torch.float32)  # float32, or float64 for float64 inputs


class _ChunkedSelectiveLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, compute_dtype, chunk_rows, with_entropy):
        # hidden [N, H], weight [V, H], targets [N]
        w = weight.to(compute_dtype)  # one cast for all chunks (autocast would cast it per matmul)
        n, acc = hidden.shape[0], _accumulate_dtype(compute_dtype)
        logps = torch.empty(n, dtype=acc, device=hidden.device)  # [N]
        entropy = torch.full((n,), float("nan"), dtype=acc, device=hidden.device)  # [N]
        lse = torch.empty(n, dtype=acc, device=hidden.device)  # [N]
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            logits = (hidden[start:stop].to(compute_dtype) @ w.T).to(acc)  # [c, V]
            if temperature != 1.0:
                logits.div_(temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)  # [c]
            lse[start:stop] = chunk_lse
            logps[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - chunk_lse
            if with_entropy:
                # H = -sum(p * log p), with log p = logits - lse (finite, so an underflowed p = 0 adds 0)
                log_probs = logits.sub_(chunk_lse[:, None])  # [c, V], in place of the logits
                entropy[start:stop] = -(log_probs.exp() * log_probs).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.compute_dtype, ctx.chunk_rows = temperature, compute_dtype, chunk_rows
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, compute_dtype, chunk_rows = ctx.temperature, ctx.compute_dtype, ctx.chunk_rows
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w, acc = weight.to(compute_dtype), lse.dtype
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None  # [V, H]
        # each chunk's weight gradient lands in one reused buffer, then adds into the float32 sum
        # (d_logits.T @ h then .float() would hold a [V, H] copy in each dtype per chunk)
        chunk_grad = torch.empty(weight.shape, dtype=compute_dtype, device=weight.device) \
            if want_weight and compute_dtype != acc else None  # [V, H]
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = min(start + chunk_rows, hidden.shape[0])
            h = hidden[start:stop].to(compute_dtype)  # [c, H]
            logits = (h @ w.T).to(acc)  # [c, V]
            if temperature != 1.0:
                logits.div_(temperature)
            # d logp(t) / d logits = onehot(t) - softmax; times the incoming gradient and 1/temperature
            d_logits = logits.sub_(lse[start:stop, None]).exp_().neg_()  # [c, V] = -softmax
            d_logits.scatter_add_(1, targets[start:stop, None], torch.ones_like(lse[start:stop, None]))
            d_logits.mul_((grad_logps[start:stop] / temperature)[:, None])
            d_logits = d_logits.to(compute_dtype)
            if want_hidden:
                grad_hidden[start:stop] = (d_logits @ w).to(hidden.dtype)  # [c, H]
            if want_weight and chunk_grad is None:
                grad_weight.addmm_(d_logits.T, h)  # [V, H]
            elif want_weight:
                torch.mm(d_logits.T, h, out=chunk_grad)
                grad_weight.add_(chunk_grad)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_selective_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            temperature: float = 1.0, compute_dtype: torch.dtype | None = None,
                            chunk_rows: int | None = None, with_entropy: bool = False,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T / temperature)[target] and, if asked, the entropy of that softmax.

    hidden [N, H], weight [V, H] (the lm_head), targets [N] -> logps [N] (differentiable in hidden
    and weight), entropy [N] (no gradient) or None; both float32 (float64 for float64 inputs).
    compute_dtype: the matmuls' dtype; default the autocast dtype when autocast is on, else
    hidden's dtype.
    """
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        logps, entropy = _ChunkedSelectiveLogps.apply(hidden, weight, targets, float(temperature), compute_dtype,
                                                      chunk_rows, with_entropy)
    return logps, entropy if with_entropy else None
