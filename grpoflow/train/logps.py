"""Per-token log-probs of completions under a model: the quantity the GRPO loss is built on."""

from __future__ import annotations

import torch

from kernels.reference import entropy_from_logits, selective_log_softmax


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, *,
                     temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids = [left-padded prompt | right-padded completion]  # [B, P + T]

    Returns log p(completion token) [B, T] and, if asked, the entropy of each position [B, T].
    Logits are divided by the sampling temperature, as the sampler did.
    """
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
