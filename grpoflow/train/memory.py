"""Where the training memory goes, and what to change when it does not fit.

    breakdown(policy, optimizer, engine)   # memory/* keys for metrics.jsonl, in GiB
    check_fits(policy, grpo, plan)         # before the first step: the checkpointed layer inputs alone
                                           # would not fit on the card -> ConfigError naming the knobs
    out_of_memory(error, ...)              # a CUDA out-of-memory in a step -> OutOfMemory naming them
    use_expandable_segments()              # grpo.expandable_segments (on in async mode): segments grow in place

The breakdown's parts: the weights (every parameter: the frozen base and the trained ones), the
trained weights alone, the optimizer's state, what vLLM took on the card when it started (its
weights, KV cache and CUDA graphs; the KV cache is released between generations with
rollout.sleep), and per step the training pass's transient memory (activations, the loss path and
the gradients: the train phase's peak above what was allocated when it started). memory/peak_gib
and memory/<phase>_peak_gib (StepMeter) are the allocator's peaks.
"""

from __future__ import annotations

import os

import torch

from grpoflow.batching import BatchPlan
from grpoflow.config import GRPOConfig
from grpoflow.errors import ConfigError, UserError
from grpoflow.private_api import cuda_allocator_settings

GIB = 2**30


class OutOfMemory(UserError, RuntimeError):
    """The card ran out of memory in a step; the message names the settings that need less."""


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def breakdown(policy, optimizer: torch.optim.Optimizer, engine=None) -> dict[str, float]:
    params = list(policy.model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values()]
    out = {"memory/weights_gib": _bytes(params) / GIB,
           "memory/trainable_gib": _bytes(p for p in params if p.requires_grad) / GIB,
           "memory/optimizer_gib": _bytes(state) / GIB}
    if getattr(engine, "device_bytes", None):
        out["memory/vllm_gib"] = engine.device_bytes / GIB
    return out


def checkpointed_inputs_bytes(model_config, grpo: GRPOConfig, dtype: torch.dtype) -> int:
    """What gradient checkpointing keeps through a micro-batch's backward: one [B, P + T, H] layer
    input per decoder layer (none on the card with offload_activations)."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    tokens = grpo.per_device_train_batch_size * (grpo.max_prompt_length + grpo.max_completion_length)
    return layers * tokens * hidden * torch.finfo(dtype).bits // 8


def knobs(grpo: GRPOConfig, plan: BatchPlan | None = None) -> list[str]:
    """The settings that need less memory, the cheapest first."""
    out = []
    if not grpo.gradient_checkpointing:
        out.append("grpo.gradient_checkpointing: true")
    elif not grpo.offload_activations:
        out.append("grpo.offload_activations: true (the checkpointed layer inputs wait in host memory)")
    if grpo.kernels == "naive":
        out.append("grpo.kernels: chunked or triton (no [B, T, V] logits)")
    if grpo.per_device_train_batch_size > grpo.num_generations or plan is None:
        out.append(f"a smaller grpo.per_device_train_batch_size ({grpo.per_device_train_batch_size}) with "
                   f"gradient_accumulation_steps or steps_per_generation up, the same batch in more micro-batches")
    out.append(f"a shorter grpo.max_completion_length ({grpo.max_completion_length})")
    out.append("rollout.gpu_memory_utilization lower (vLLM's share, KV cache included), or rollout.sleep: true")
    out.append("rollout.kv_cache_dtype: fp8 (half the KV cache a token, for the same completions)")
    return out


def check_fits(policy, grpo: GRPOConfig, plan: BatchPlan) -> None:
    """Refuse a run whose checkpointed layer inputs alone exceed the card's free memory now (the
    weights, optimizer and vLLM already counted), before any step is spent finding out."""
    if policy.device.type != "cuda" or grpo.offload_activations or not grpo.gradient_checkpointing:
        return
    config = getattr(policy.model, "config", None)
    need = checkpointed_inputs_bytes(config, grpo, policy.dtype)
    free, total = torch.cuda.mem_get_info(policy.device)
    if need > free:
        raise ConfigError(
            f"a micro-batch of {grpo.per_device_train_batch_size} x {grpo.max_prompt_length} + "
            f"{grpo.max_completion_length} tokens keeps {need / GIB:.1f} GiB of layer inputs through its backward "
            f"({config.num_hidden_layers} layers x hidden {config.hidden_size}), and the card has {free / GIB:.1f} "
            f"of {total / GIB:.1f} GiB free; set " + "; or ".join(knobs(grpo, plan)))


def use_expandable_segments() -> None:
    """torch's CUDA allocator maps its segments in growable ranges (grpo.expandable_segments), so a
    freed block's memory serves a larger request later instead of sitting cached beside it. The
    variable is what vLLM reads to keep its own pool (rollout.sleep, which cannot use such segments) on
    plain ones; the call reaches an allocator already started by anything before the policy."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" not in conf:
        kept = [kv for kv in conf.split(",") if kv and not kv.startswith("expandable_segments:")]
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join([*kept, "expandable_segments:True"])
    if torch.cuda.is_available():
        cuda_allocator_settings("expandable_segments:True")


def out_of_memory(error: BaseException, grpo: GRPOConfig, step: int, phase: str,
                  plan: BatchPlan | None = None) -> OutOfMemory:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    peak = (f"; the allocator's peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB"
            if torch.cuda.is_available() else "")
    settings = knobs(grpo, plan)
    # a step's out-of-memory can be the allocator's cached blocks of other sizes: unless this process grows its
    # segments in place already (the setting, or the user's own PYTORCH_CUDA_ALLOC_CONF)
    if "expandable_segments:True" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        settings.insert(0, "grpo.expandable_segments: true (memory the allocator holds unused comes back into play)")
    return OutOfMemory(f"out of GPU memory in the {phase} of step {step + 1} ({first}{peak}). Settings that need "
                       f"less: " + "; ".join(settings))
