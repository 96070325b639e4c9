"""Per-token log-probs of completions under a model: the quantity the GRPO loss is built on.

Three paths, chosen by `grpo.kernels`:
    chunked  the backbone's hidden states go through the lm_head in row chunks
             (kernels/chunked.py): the [B, T, V] logits never exist
    triton   the same from hidden states, fused in Triton (kernels/triton_logps.py): vocabulary
             tiles with an online logsumexp, no [rows, V] tensor in the forward; CUDA only, else
             it falls back to chunked with one warning (see `triton_or_fallback`)
    naive    the model's own forward makes the logits, then log-softmax: the reference path,
             and the fallback for heads the fused paths do not model (see `plain_lm_head`)
    auto     (the default) triton on a CUDA device with triton installed, chunked elsewhere,
             silently: on an H100, triton took 0.19-0.49x chunked's time (benchmarks/RESULTS.md, issue #7)
"""

from __future__ import annotations

import logging

import torch

from grpoflow.kernels.chunked import chunked_selective_logps
from grpoflow.kernels.reference import entropy_from_logits, grpo_loss, selective_log_softmax
from grpoflow.kernels.triton_support import triton_unavailable

log = logging.getLogger("grpoflow.train")

# config attributes that change the logits after the lm_head matmul: such heads take the naive path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
_warned: set = set()  # each fallback is said once a process


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, *,
                     temperature: float, with_entropy: bool = False,
                     kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids = [left-padded prompt | right-padded completion]  # [B, P + T]

    Returns log p(completion token) [B, T] and, if asked, the entropy of each position [B, T].
    Logits are divided by the sampling temperature, as the sampler did.
    """
    kernels = resolve_kernels(kernels, input_ids.device)
    if kernels in ("chunked", "triton"):
        head = plain_lm_head(model, kernels)
        if head is not None:
            return _from_hidden(model, head, input_ids, attention_mask, completion_len, temperature, with_entropy,
                                kernels)
    return _naive(model, input_ids, attention_mask, completion_len, temperature, with_entropy)


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """The path grpo.kernels takes on `device`: auto is triton on CUDA where triton is installed and
    chunked elsewhere (never the CPU interpreter, which is for tests); triton falls back to chunked
    with one warning; the others as named."""
    if kernels == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_unavailable(device) is None else "chunked"
    return triton_or_fallback(device) if kernels == "triton" else kernels


def triton_or_fallback(device: torch.device) -> str:
    """"triton" where the Triton kernels run; else "chunked" (the same log-probs up to rounding, also
    without the [B, T, V] logits), with one warning: a config written for a GPU machine still runs on
    a laptop or in CI."""
    reason = triton_unavailable(device)
    if reason is None:
        return "triton"
    if reason not in _warned:
        _warned.add(reason)
        log.warning("grpo.kernels=triton: %s; using grpo.kernels=chunked (kernels/chunked.py, the same log-probs "
                    "and loss in plain torch)", reason)
    return "chunked"


def loss_function(kernels: str, device: torch.device):
    """The GRPO loss for `grpo.kernels`: the fused Triton one, or kernels/reference.py's (which
    chunked and naive use; both take the [B, T] log-probs, and the reference is fast at that size)."""
    if resolve_kernels(kernels, device) == "triton":
        from grpoflow.kernels.triton_loss import triton_grpo_loss

        return triton_grpo_loss
    return grpo_loss


def plain_lm_head(model, kernels: str = "chunked") -> torch.nn.Linear | None:
    """The lm_head when logits = hidden @ W.T exactly (no bias, scale, softcap or adapter); else None."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config.get_text_config()
    transforms = [a for a in _LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1.0)]
    reason = None
    if type(head) is not torch.nn.Linear:
        reason = f"its lm_head is a {type(head).__name__} (e.g. LoRA on lm_head), not a plain Linear"
    elif head.bias is not None:
        reason = "its lm_head has a bias"
    elif transforms:
        reason = f"its config transforms the logits ({', '.join(transforms)})"
    if reason is None:
        return head
    if (kernels, reason) not in _warned:
        _warned.add((kernels, reason))
        log.warning("grpo.kernels=%s: %s; log-probs take the naive path (full [B, T, V] logits)", kernels, reason)
    return None


def _from_hidden(model, head: torch.nn.Linear, input_ids, attention_mask, completion_len: int, temperature: float,
                 with_entropy: bool, kernels: str):
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state  # [B, P + T, H]
    hidden = hidden[:, -completion_len - 1:-1]  # [B, T, H]: position t predicts completion token t
    targets = input_ids[:, -completion_len:]  # [B, T]
    # only the tokens that were written (not the padding after EOS) go through the head
    written = attention_mask[:, -completion_len:].bool()  # [B, T]
    logps_flat, entropy_flat = _selective_logps(kernels)(hidden[written], head.weight, targets[written],
                                                         temperature=temperature, with_entropy=with_entropy)  # [n]
    logps = logps_flat.new_zeros(targets.shape).masked_scatter(written, logps_flat)  # [B, T]
    entropy = None
    if with_entropy:
        entropy = entropy_flat.new_zeros(targets.shape).masked_scatter(written, entropy_flat)  # [B, T]
    return logps, entropy


def _selective_logps(kernels: str):
    if kernels == "triton":
        from grpoflow.kernels.triton_logps import triton_selective_logps  # imports triton

        return triton_selective_logps
    return chunked_selective_logps


def labelled_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                 kernels: str = "auto") -> torch.Tensor:
    """Supervised fine-tuning's loss: the mean negative log-likelihood of the tokens `labels` keeps
    (-100 elsewhere; labels[:, t] is the token at t, predicted from t - 1), as transformers' `labels=`
    computes it, through grpo.kernels' path: the chunked and Triton ones never make the [B, L, V]
    logits, which for a warm-up batch of 16 x 768 tokens and a 49,152-token vocabulary are 2.3 GiB
    in float32 before their gradient."""
    kernels = resolve_kernels(kernels, input_ids.device)
    head = plain_lm_head(model, kernels) if kernels in ("chunked", "triton") else None
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state[:, :-1]  # [B, L - 1, H]
    targets = labels[:, 1:]  # [B, L - 1]
    kept = targets != -100
    logps, _ = _selective_logps(kernels)(hidden[kept], head.weight, targets[kept], temperature=1.0,
                                         with_entropy=False)  # [n]
    return -logps.float().mean()


def _naive(model, input_ids, attention_mask, completion_len: int, temperature: float, with_entropy: bool):
    # only the last T + 1 positions' logits are needed: the rest of [B, P + T, V] is never made
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion_len + 1).logits
    logits = logits[:, :-1, :]  # [B, T, V]: position t predicts completion token t
    if temperature != 1.0:
        # in place: a second [B, T, V] copy is the largest allocation of the step (the matmul that
        # made the logits does not need them for its backward)
        logits = logits.div_(temperature)
    targets = input_ids[:, -completion_len:]  # [B, T]
    logps = selective_log_softmax(logits, targets)  # [B, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())  # [B, T]
    return logps, entropy
