"""Fused selective log-prob in Triton: log p(target) from hidden states, never holding the [N, V] logits.

    logps, entropy = triton_selective_logps(hidden, lm_head.weight, targets, temperature=0.7, with_entropy=True)

Same contract as kernels/chunked.py's chunked_selective_logps (and tested against the same float64
log-softmax); what differs is where the logits live:

    forward   one kernel: each program takes BLOCK_N rows and a range of vocabulary tiles, makes
              each tile's logits z = h @ W.T / temperature [BLOCK_N, BLOCK_V] in float32 registers
              and folds it into an online logsumexp (running max m, sum s = sum exp(z - m)), the
              target's logit and, for the entropy, u = sum exp(z - m) * (z - m). The vocabulary is
              split over several programs per row block (enough programs to fill the GPU when N is
              small); their partial (m, s, u) are merged in torch, [splits, N] floats. Nothing of
              size [N, V] or [rows, V] is ever written.
    backward  rows in chunks of `chunk_rows`: a kernel remakes the chunk's tile logits the same
              way (float32 from the same dot products, so the softmax matches the forward's
              logsumexp exactly) and writes d_logits = g * (onehot(target) - softmax) / temperature
              in the compute dtype, [chunk_rows, V]; then two cuBLAS matmuls:
              d_hidden = d_logits @ W, and d_W += d_logits.T @ h only when W requires grad
              (under LoRA the lm_head is frozen: no [V, H] gradient, no [V, H] matmul).

Matmuls take the compute dtype (bf16/fp16/fp32; fp32 inputs use IEEE fp32 dot products, not TF32);
everything after them is float32. Inputs may be of another dtype than the compute dtype (float32
master weights under bf16 autocast): tiles are cast as they are loaded, the weight is never copied
in the forward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from grpoflow.kernels.triton_support import interpreting, sm_count

# bytes of the backward's d_logits chunk [chunk_rows, V] in the compute dtype: with the float32
# vectors kept per row (ROW_BYTES), no more than the hidden states [N, H] it differentiates, so the
# kernel's own memory stays within its input's (Liger sizes its chunks the same way); but at least
# CHUNK_BYTES_MIN (smaller chunks leave the GPU waiting between launches: 1.03-1.08x naive's time
# at (8*4096, 4096, 128256) with 64 MiB, 0.87-0.92x with 256 MiB, H100) and at most CHUNK_BYTES_MAX
CHUNK_BYTES_MIN = 64 * 2**20
CHUNK_BYTES_MAX = 256 * 2**20
ROW_BYTES = 16  # logps, logsumexp, entropy and the incoming gradient: float32 each
# with a trained lm_head each chunk also adds its [V, H] gradient into the sum: at least this
# many rows per chunk keep those additions few (and their rounding, for a half-precision weight)
MIN_ROWS_TRAINED_HEAD = 2048
_NEG = tl.constexpr(-1.0e30)  # running max before any tile: finite, so exp(_NEG - m) = 0 and 0 * _NEG = 0, never NaN
_COMPUTE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_GROUP = tl.constexpr(8)  # row blocks that run side by side over the same vocabulary tiles, for L2 reuse of W


def _configs():
    if interpreting():  # one small config: the interpreter runs every program in numpy, one at a time
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bv, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4), (64, 256, 32, 8, 4)]]


@triton.jit
def _to_compute(x, COMPUTE: tl.constexpr):
    if COMPUTE == 1:
        return x.to(tl.bfloat16)
    elif COMPUTE == 2:
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _tile_logits(hidden_ptr, weight_ptr, rows, row_ok, cols, col_ok, H, stride_hn, stride_hh, stride_wv, stride_wh,
                 inv_temperature, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = hidden[rows] @ weight[cols].T / temperature: [BLOCK_N, BLOCK_V] float32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        w = tl.load(weight_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wh,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_V]
        h, w = _to_compute(h, COMPUTE), _to_compute(w, COMPUTE)
        if INTERPRET:
            # Triton 3.7's interpreter multiplies bfloat16 blocks as raw integers: the same
            # bf16-rounded values, multiplied in float32 (exact products, float32 sums as on the GPU)
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    return acc * inv_temperature


@triton.autotune(configs=_configs(), key=["V", "H", "COMPUTE", "WITH_ENTROPY"])
@triton.jit
def _logps_fwd_kernel(hidden_ptr, weight_ptr, targets_ptr, max_ptr, sum_ptr, ent_ptr, target_ptr, hit_ptr,
                      N, V, H, splits, stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
                      COMPUTE: tl.constexpr, PRECISION: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                      INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # program -> (row block, vocabulary split), _GROUP row blocks at a time over all splits
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    in_group = _GROUP * splits
    first = (pid // in_group) * _GROUP
    group_size = tl.minimum(row_blocks - first, _GROUP)
    row_block = first + (pid % in_group) % group_size
    split = (pid % in_group) // group_size

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    targets = tl.load(targets_ptr + rows64, mask=row_ok, other=-1)  # [BLOCK_N]
    tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(tiles, splits)

    m = tl.full((BLOCK_N,), _NEG, dtype=tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    target_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    hit = tl.zeros((BLOCK_N,), dtype=tl.float32)  # 1 where the target fell in one of this split's tiles
    for tile in range(split * per_split, tl.minimum((split + 1) * per_split, tiles)):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _tile_logits(hidden_ptr, weight_ptr, rows64, row_ok, cols.to(tl.int64), col_ok, H, stride_hn, stride_hh,
                         stride_wv, stride_wh, inv_temperature, COMPUTE, PRECISION, INTERPRET, BLOCK_N, BLOCK_V,
                         BLOCK_K)
        z = tl.where(col_ok[None, :], z, _NEG)  # [BLOCK_N, BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # 0 in the columns past V
        if WITH_ENTROPY:
            # u was relative to m; relative to m_new each old term gains (m - m_new)
            u = rescale * (u + (m - m_new) * s) + tl.sum(p * (z - m_new[:, None]), axis=1)
        s = rescale * s + tl.sum(p, axis=1)
        m = m_new
        is_target = (cols[None, :] == targets[:, None]) & col_ok[None, :]
        target_z += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        hit += tl.sum(is_target.to(tl.float32), axis=1)
    out = split * N + rows64
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + out, u, mask=row_ok)
    tl.store(target_ptr + out, target_z, mask=row_ok)
    tl.store(hit_ptr + out, hit, mask=row_ok)


@triton.autotune(configs=_configs(), key=["V", "H", "COMPUTE"])
@triton.jit
def _logps_bwd_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_ptr, d_logits_ptr, row_start, rows_in_chunk,
                      V, H, stride_hn, stride_hh, stride_wv, stride_wh, stride_dn, inv_temperature,
                      COMPUTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # program -> (row block, vocabulary tile), grouped as in Triton's matmul tutorial
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(rows_in_chunk, BLOCK_N)
    tiles = tl.cdiv(V, BLOCK_V)
    in_group = _GROUP * tiles
    first = (pid // in_group) * _GROUP
    group_size = tl.minimum(row_blocks - first, _GROUP)
    row_block = first + (pid % in_group) % group_size
    tile = (pid % in_group) // group_size

    local = row_block * BLOCK_N + tl.arange(0, BLOCK_N)  # rows within the chunk
    row_ok = local < rows_in_chunk
    rows64 = (row_start + local).to(tl.int64)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    z = _tile_logits(hidden_ptr, weight_ptr, rows64, row_ok, cols.to(tl.int64), col_ok, H, stride_hn, stride_hh,
                     stride_wv, stride_wh, inv_temperature, COMPUTE, PRECISION, INTERPRET, BLOCK_N, BLOCK_V,
                         BLOCK_K)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows64, mask=row_ok, other=-1)
    # d logp(t) / d z = onehot(t) - softmax(z); z = logits / temperature
    g = tl.load(grad_ptr + rows64, mask=row_ok, other=0.0) * inv_temperature
    softmax = tl.exp(z - lse[:, None])
    d = g[:, None] * (tl.where(cols[None, :] == targets[:, None], 1.0, 0.0) - softmax)  # [BLOCK_N, BLOCK_V]
    tl.store(d_logits_ptr + local.to(tl.int64)[:, None] * stride_dn + cols[None, :], _to_compute(d, COMPUTE),
             mask=row_ok[:, None] & col_ok[None, :])


def _precision(compute_dtype: torch.dtype) -> str:
    return "ieee" if compute_dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16/fp16 inputs


def _splits(n: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits per row block: enough programs for ~4 per SM when N is small."""
    row_blocks = max(1, math.ceil(n / 128))
    target = 4 * sm_count(device) if device.type == "cuda" else 4  # interpreter: still several, to test the merge
    return max(1, min(math.ceil(target / row_blocks), math.ceil(vocab / 64), 64))


class TritonSelectiveLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, compute_dtype, chunk_rows, with_entropy):
        # hidden [N, H], weight [V, H], targets [N]
        (n, h), vocab = hidden.shape, weight.shape[0]
        splits = _splits(n, vocab, hidden.device)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        part_max, part_sum = torch.empty(splits, n, **f32), torch.empty(splits, n, **f32)  # [S, N]
        part_ent = torch.empty(splits, n, **f32) if with_entropy else part_sum  # [S, N] (unused if not asked)
        part_target, part_hit = torch.empty(splits, n, **f32), torch.empty(splits, n, **f32)  # [S, N]
        if n > 0:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)  # noqa: E731
            _logps_fwd_kernel[grid](hidden, weight, targets, part_max, part_sum, part_ent, part_target, part_hit,
                                    n, vocab, h, splits, hidden.stride(0), hidden.stride(1), weight.stride(0),
                                    weight.stride(1), 1.0 / temperature, COMPUTE=_COMPUTE[compute_dtype],
                                    PRECISION=_precision(compute_dtype), WITH_ENTROPY=with_entropy,
                                    INTERPRET=interpreting())
        # merge the splits: each (m_i, s_i) is a logsumexp m_i + log s_i over part of the vocabulary
        m = part_max.amax(0)  # [N]
        scale = torch.exp(part_max - m)  # [S, N]
        s = (part_sum * scale).sum(0)  # [N]
        lse = m + torch.log(s)  # [N]
        # a target outside [0, V) hits no tile: NaN, so the loss's finiteness check sees it
        hit = part_hit.sum(0)  # [N]
        logps = torch.where(hit == 1, part_target.sum(0) - lse, float("nan"))  # [N]
        entropy = None
        if with_entropy:
            # H = log s - sum p (z - m), with each split's u_i moved from m_i to m
            u = (scale * (part_ent + (part_max - m) * part_sum)).sum(0)  # [N]
            entropy = torch.log(s) - u / s  # [N]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.compute_dtype, ctx.chunk_rows = temperature, compute_dtype, chunk_rows
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        compute_dtype, temperature = ctx.compute_dtype, ctx.temperature
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        (n, h), vocab = hidden.shape, weight.shape[0]
        chunk_rows = ctx.chunk_rows or _chunk_rows(n, hidden.shape[1], vocab, compute_dtype, want_weight)
        chunk_rows = max(1, min(chunk_rows, n))
        grad_logps = grad_logps.float().contiguous()
        w = weight.to(compute_dtype)  # [V, H]; the weight itself when it is already in the compute dtype
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # [N, H]
        # The lm_head's gradient [V, H], summed over row chunks. A weight held in the compute dtype
        # gets it in that dtype, each chunk's matmul adding into it in place (float32 inside the
        # matmul, rounded once per chunk, as Liger does): no float32 [V, H] sum and no [V, H]
        # chunk buffer. A float32 weight (full fine-tuning's master weights under autocast) gets a
        # float32 sum of the half-precision chunk products.
        in_place = want_weight and weight.dtype == compute_dtype
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype if in_place else torch.float32,
                                  device=weight.device) if want_weight else None
        chunk_grad = torch.empty(weight.shape, dtype=compute_dtype, device=weight.device) \
            if want_weight and not in_place and compute_dtype != torch.float32 else None  # [V, H], reused
        d_logits_buffer = torch.empty(chunk_rows, vocab, dtype=compute_dtype, device=hidden.device)  # [c, V]
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            d_logits = d_logits_buffer[:rows]  # [rows, V]
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"])  # noqa: E731
                                 * triton.cdiv(vocab, meta["BLOCK_V"]),)
            _logps_bwd_kernel[grid](hidden, weight, targets, lse, grad_logps, d_logits, start, rows, vocab, h,
                                    hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                                    d_logits.stride(0), 1.0 / temperature, COMPUTE=_COMPUTE[compute_dtype],
                                    PRECISION=_precision(compute_dtype), INTERPRET=interpreting())
            if want_hidden:
                if hidden.dtype == compute_dtype:
                    torch.mm(d_logits, w, out=grad_hidden[start:start + rows])  # [rows, H]
                else:
                    grad_hidden[start:start + rows] = d_logits @ w
            if want_weight:
                h_chunk = hidden[start:start + rows].to(compute_dtype)  # [rows, H]
                if chunk_grad is None:
                    grad_weight.addmm_(d_logits.T, h_chunk)  # [V, H]
                else:
                    torch.mm(d_logits.T, h_chunk, out=chunk_grad)
                    grad_weight.add_(chunk_grad)
        if want_weight and not in_place:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunk_rows(n: int, hidden_size: int, vocab: int, compute_dtype: torch.dtype, weight_trained: bool) -> int:
    item = torch.finfo(compute_dtype).bits // 8
    chunk_bytes = min(max(n * (hidden_size * item - ROW_BYTES), CHUNK_BYTES_MIN), CHUNK_BYTES_MAX)
    rows = max(1, chunk_bytes // (vocab * item))
    return max(rows, MIN_ROWS_TRAINED_HEAD) if weight_trained else rows


def triton_selective_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           temperature: float = 1.0, compute_dtype: torch.dtype | None = None,
                           chunk_rows: int | None = None, with_entropy: bool = False,
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T / temperature)[target] and, if asked, the entropy of that softmax.

    hidden [N, H], weight [V, H] (the lm_head), targets [N] in [0, V) -> logps [N] (differentiable
    in hidden and weight), entropy [N] (no gradient) or None; both float32. A target outside
    [0, V) gives NaN. compute_dtype: the matmuls' dtype (float32, bfloat16 or float16); default the
    autocast dtype when autocast is on, else hidden's dtype. chunk_rows: rows per backward chunk;
    default from the size of hidden, CHUNK_BYTES_MIN and CHUNK_BYTES_MAX (at least MIN_ROWS_TRAINED_HEAD when the weight is trained).
    """
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if compute_dtype not in _COMPUTE:
        raise ValueError(f"compute_dtype {compute_dtype} is not one of {list(_COMPUTE)} (the Triton kernels' dtypes); "
                         "use kernels/chunked.py for float64")
    if (hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]
            or targets.shape != hidden.shape[:1]):
        raise ValueError(f"expected hidden [N, H], weight [V, H], targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    with torch.autocast(hidden.device.type, enabled=False):
        logps, entropy = TritonSelectiveLogps.apply(hidden, weight, targets.contiguous(), float(temperature),
                                                    compute_dtype, chunk_rows, with_entropy)
    return logps, entropy
