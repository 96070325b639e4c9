"""One micro-batch's GRPO loss, as the training loop calls it, and the KL term's reference model."""

from __future__ import annotations

from typing import Any

import torch

from grpoflow.config import GRPOConfig
from grpoflow.kernels.reference import GENERATION_NORMALISED, high_entropy_mask
from grpoflow.train.distributed import Distributed, shard_fsdp
from grpoflow.train.generation import GenerationBatch, importance_weights
from grpoflow.train.logps import completion_logps, loss_function
from grpoflow.train.policy import Policy


def micro_step_loss(policy: Policy, micro: dict[str, Any], buffer: GenerationBatch, grpo: GRPOConfig,
                    ref_model: Policy | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to backpropagate for `micro` (a slice of `buffer`, the generation it comes from)
    and its metrics: the loss's own, the entropy, and the importance-sampling figures."""
    T = micro["completion_mask"].shape[1]  # the micro-batch's own width (GenerationBatch.rows_of)
    ref_logps = None
    if grpo.beta > 0:  # before the training forward: a sharded policy gives its gathered weights back after this
        with torch.no_grad(), policy.autocast():
            if ref_model is None:  # LoRA: the reference is the base, the adapters switched off
                with policy.model.disable_adapter():
                    ref_logps, _ = policy.run(completion_logps, micro["input_ids"], micro["attention_mask"], T,
                                              temperature=grpo.temperature, kernels=grpo.kernels)
            else:
                ref_logps, _ = ref_model.run(completion_logps, micro["input_ids"], micro["attention_mask"], T,
                                            temperature=grpo.temperature, kernels=grpo.kernels)
        ref_logps = ref_logps.float()
    with policy.autocast():
        logps, entropy = policy.train_logps(micro["input_ids"], micro["attention_mask"], T,  # [b, T]
                                            temperature=grpo.temperature, with_entropy=True, kernels=grpo.kernels)
    mask = micro["completion_mask"]
    importance_sampling_ratio, is_metrics = micro["importance_sampling_ratio"], {}
    if micro["sampling_logps"] is not None:  # on-policy samples of another engine: this pass is the trainer's view
        importance_sampling_ratio, is_metrics = importance_weights(logps, micro["sampling_logps"], mask,
                                                    grpo.vllm_importance_sampling_cap)
    entropy_mask = None
    if grpo.top_entropy_quantile < 1.0:  # one threshold over every process's tokens, as TRL
        entropy_mask = high_entropy_mask(entropy, mask, grpo.top_entropy_quantile, gather=all_processes)
    grpo_loss = loss_function(grpo.kernels, logps.device)
    loss, metrics = grpo_loss(
        logps.float(), micro["old_logps"], ref_logps, micro["advantages"], mask,
        loss_type=grpo.loss_type, epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, delta=grpo.delta,
        beta=grpo.beta, importance_sampling_level=grpo.importance_sampling_level,
        max_completion_length=grpo.max_completion_length,
        # DDP averages the processes' gradients: each divides by its share of the generation's tokens
        num_items_in_batch=buffer.num_items / buffer.num_processes, importance_sampling_ratio=importance_sampling_ratio,
        sapo_temperature_pos=grpo.sapo_temperature_pos, sapo_temperature_neg=grpo.sapo_temperature_neg,
        entropy_mask=entropy_mask)
    if grpo.loss_type not in GENERATION_NORMALISED:
        # dapo and cispo already divide by the tokens of the whole generation; the others are micro-batch means
        loss = loss / grpo.gradient_accumulation_steps
    active = mask.sum()
    metrics["entropy"] = ((entropy * mask).sum() / active.clamp(min=1)).item()
    return loss, {**{k: float(v) for k, v in metrics.items()}, **is_metrics}


def forward_share(loss_type: str, part_mask: torch.Tensor, micro_mask: torch.Tensor) -> float:
    """The weight of a part of a micro-batch's rows (grpo.max_tokens_per_forward) in its loss: the
    part's loss, so weighted and summed over the parts, is the micro-batch's. Masks [rows, T]."""
    if loss_type in GENERATION_NORMALISED:  # a sum over tokens divided by the generation's count: additive
        return 1.0
    if loss_type == "bnpo":  # a mean over the micro-batch's tokens
        return float(part_mask.sum() / micro_mask.sum().clamp(min=1))
    return part_mask.shape[0] / micro_mask.shape[0]  # grpo, sapo, dr_grpo: a mean over rows


def all_processes(values: torch.Tensor) -> torch.Tensor:
    """[n] values of this process -> every process's, concatenated in rank order (n may differ)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    world = torch.distributed.get_world_size()
    sizes = [torch.zeros((), dtype=torch.long, device=values.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor(values.numel(), device=values.device))
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)  # all_gather takes equal shapes
    padded[:values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:int(size)] for part, size in zip(parts, sizes)])


def reference_model(policy: Policy, model_path: str, dist: Distributed) -> Policy:
    """The frozen base model for the KL term under full fine-tuning (LoRA's reference is the base
    with the adapters off), sharded as the policy is."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=policy.dtype).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    reference = Policy(ref, policy.tokenizer, policy.device, policy.dtype, is_peft=False)
    if policy.fsdp is not None:
        reference.fsdp = shard_fsdp(ref, dist, policy.dtype, "KL reference")
    else:
        ref.to(policy.device)
    return reference


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the micro-batches that have it (a micro-batch of masked rows has no
    importance-sampling figures)."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def token_weighted(records: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """The metrics of a micro-batch's parts (tokens, metrics) as the whole micro-batch's: each
    part's mean weighted by its tokens (one part: its metrics as they are)."""
    if len(records) == 1:
        return records[0][1]
    out = {}
    for key in dict.fromkeys(k for _, m in records for k in m):
        have = [(max(w, 1e-9), m[key]) for w, m in records if key in m]
        if key.endswith("/max") or key.endswith("/min"):
            out[key] = (max if key.endswith("/max") else min)(v for _, v in have)
        else:
            out[key] = sum(w * v for w, v in have) / sum(w for w, _ in have)
    return out
