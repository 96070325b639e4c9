"""Pick and build the rollout engine that `rollout.engine` names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from grpoflow.config import ConfigError, RolloutConfig
from grpoflow.rollout.hf import HFEngine, transformers_engine

log = logging.getLogger("grpoflow.rollout")
_warned_fallback = False


def resolve_engine(cfg: RolloutConfig) -> str:
    """'vllm' or 'hf'. `vllm` that cannot run is an error saying how to fix it; `auto` falls back
    to transformers generate, with one warning when a GPU is there but vLLM is not usable."""
    import torch

    from grpoflow.rollout.vllm import import_vllm

    global _warned_fallback
    if cfg.engine == "hf":
        return "hf"
    if cfg.engine == "vllm":
        if not torch.cuda.is_available():
            raise ConfigError("rollout.engine: vllm needs a CUDA GPU; on this machine use hf or auto")
        import_vllm()
        return "vllm"
    if not torch.cuda.is_available():
        return "hf"
    try:
        import_vllm()
    except ConfigError as e:
        if not _warned_fallback:
            _warned_fallback = True
            log.warning("rollout.engine: auto uses transformers generate, several times slower than vLLM: %s", e)
        return "hf"
    return "vllm"


def shares_base_weights(cfg) -> bool:
    """Whether a training run's frozen base weights will be vLLM's own tensors (LoRA, vLLM colocated,
    rollout.share_weights, unsharded): the policy then loads into host memory and moves to the card
    only after vLLM started, so the card never holds the base weights twice (at start, vLLM's
    copy and the policy's would both be there, 16 GB more for an 8B model)."""
    rollout = cfg.rollout
    return (cfg.model.finetune == "lora" and rollout.share_weights and rollout.placement == "colocate"
            and cfg.grpo.distributed != "fsdp" and resolve_engine(rollout) == "vllm")


def vllm_quantization(rollout: RolloutConfig, finetune: str | None) -> str | None:
    """vLLM's `quantization`: rollout.quantization, with auto read as bitsandbytes for a QLoRA run
    (vLLM quantizes the same checkpoint to nf4 as it loads, as the trainer's base is) and none else."""
    if rollout.quantization == "auto":
        return "bitsandbytes" if finetune == "qlora" else None
    return None if rollout.quantization == "none" else rollout.quantization


def make_engine(rollout: RolloutConfig, model_path: str, *, policy=None, lora_rank: int | None = None,
                dtype: str = "bfloat16", max_model_len: int, seed: int = 0, batch_size: int = 16,
                completions_per_call: int | None = None, largest_call: int | None = None,
                progress: bool = True, dist=None, finetune: str | None = None):
    """The engine `rollout.engine` names, for training or for evaluation.

    Training (`policy`: the model being trained, `lora_rank` its adapters' rank, None for full
    fine-tuning): transformers generate runs the policy itself (its weights gathered for each call
    when sharded); vLLM loads `model_path`, is handed the policy's weights before each generation
    (`sync_weights`), sleeps while the trainer works (rollout.sleep) and shares a LoRA policy's
    frozen base weights (rollout.share_weights). Evaluation (no policy): the model in `model_path`,
    a folder, a Hub id or a LoRA adapters folder.
    batch_size: prompts per transformers generate call; completions_per_call: what vLLM runs at once;
    largest_call: the most completions any call asks for (`largest_call_for(grpo, ...)`).
    finetune: model.finetune of the run being trained (rollout.quantization's auto reads it).
    rollout.placement server (training only; dist: the training processes): a rollout server
    generates, grpoflow/rollout/server.py.
    """
    if policy is not None and rollout.placement == "server":
        return _server_engine(rollout, model_path, policy=policy, lora_rank=lora_rank, dtype=dtype,
                              max_model_len=max_model_len, seed=seed, completions_per_call=completions_per_call,
                              largest_call=largest_call, dist=dist, finetune=finetune)
    if resolve_engine(rollout) == "hf":
        if policy is not None:
            return HFEngine(policy.model, policy.tokenizer, batch_size=batch_size, progress=False,
                            autocast=policy.autocast, generate=policy.generate)
        return transformers_engine(model_path, batch_size=batch_size, progress=progress)
    from grpoflow.rollout.vllm import VLLMEngine

    base, tokenizer, adapters = model_path, None, None
    if policy is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        adapter_config = Path(model_path) / "adapter_config.json"
        if adapter_config.is_file():
            adapter = json.loads(adapter_config.read_text())
            base, lora_rank, adapters = adapter["base_model_name_or_path"], adapter["r"], str(model_path)
    training = policy is not None  # evaluation neither sleeps nor seeds each prompt
    engine = VLLMEngine(base, tokenizer or policy.tokenizer, dtype=dtype,
                        gpu_memory_utilization=rollout.gpu_memory_utilization, max_model_len=max_model_len,
                        seed=seed, lora_rank=lora_rank, sleep=training and rollout.sleep,
                        enforce_eager=rollout.enforce_eager, seed_per_prompt=training and rollout.seed_per_prompt,
                        completions_per_call=completions_per_call, largest_call=largest_call,
                        quantization=vllm_quantization(rollout, finetune), kv_cache_dtype=rollout.kv_cache_dtype)
    if adapters:
        from vllm.lora.request import LoRARequest

        engine.lora_request = LoRARequest("evaluated", 1, adapters)
    if policy is not None and lora_rank and rollout.share_weights:
        if policy.fsdp is None:
            engine.share_weights(policy)
        else:  # vLLM needs whole tensors; the policy holds 1/N of each
            log.info("rollout.share_weights: not under grpo.distributed: fsdp (the policy's base weights are "
                     "shards); vLLM keeps its own copy")
    return engine


def _server_engine(rollout: RolloutConfig, model_path: str, *, policy, lora_rank: int | None, dtype: str,
                   max_model_len: int, seed: int, completions_per_call: int | None, dist, finetune: str | None = None,
                   largest_call: int | None = None):
    """The trainer's side of rollout.placement server: a connection to rollout.server_address, or to
    a server this process starts on rollout.server_gpus (one training process only; several need
    one server they all reach: `grpoflow rollout-server`)."""
    import uuid

    from grpoflow.rollout.server import ServerEngine, server_key, start_server

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    started = None
    address = rollout.server_address
    if address is None:
        if world > 1:
            raise ConfigError("rollout.placement: server on several training processes needs one server they all "
                              "reach: start it with `grpoflow rollout-server -c CONFIG` and set "
                              "rollout.server_address to the address it prints")
        spec = _spec(rollout, model_path, dtype=dtype, lora_rank=lora_rank, max_model_len=max_model_len, seed=seed,
                     completions_per_call=completions_per_call, largest_call=largest_call, finetune=finetune)
        started = start_server(spec, gpus=rollout.server_gpus, timeout=rollout.server_timeout_s)
        address, key = started.address, started.key
    else:
        key = server_key()
    # one name for this run's weights on every process: a version is (session, step)
    session = uuid.uuid4().hex if dist is None else dist.all_gather(uuid.uuid4().hex)[0]
    try:
        engine = ServerEngine(address, key, policy.tokenizer, rank=rank, session=session,
                              timeout=rollout.server_timeout_s, retries=rollout.server_push_retries, push=rank == 0,
                              sharded=getattr(policy, "fsdp", None) is not None, lora_rank=lora_rank)
    except BaseException:
        if started is not None:
            started.close()
        raise
    engine.started = started  # closed with the engine
    return engine


def server_spec(cfg, model_path: str, num_processes: int):
    """What a rollout server started for a training job runs (`grpoflow rollout-server`, the launcher):
    the trainer's engine settings, sized to the whole generation of every process at once."""
    from grpoflow.batching import BatchPlan

    grpo, rollout = cfg.grpo, cfg.rollout
    plan = BatchPlan.from_config(grpo, num_processes=num_processes)
    per_call = plan.unique_prompts * grpo.num_generations
    return _spec(rollout, str(model_path), dtype=cfg.model.dtype,
                 lora_rank=cfg.model.lora.r if cfg.model.finetune != "full" else None,
                 max_model_len=rollout.max_model_len or grpo.max_prompt_length + grpo.max_completion_length,
                 seed=grpo.seed, completions_per_call=per_call, largest_call=largest_call_for(grpo, per_call),
                 finetune=cfg.model.finetune)


def largest_call_for(grpo, completions_per_call: int) -> int:
    """The most completions one generate call of a training run's engine asks for: a generation's
    (a dynamic-sampling refill's, up to MAX_REFILL times that), the held-out questions of evaluation
    during training, or the warm-up's format check."""
    from grpoflow.batching import MAX_REFILL

    generation = completions_per_call * (MAX_REFILL if grpo.dynamic_sampling else 1)
    return max(generation, grpo.eval_prompts if grpo.eval_strategy == "steps" else 0,
               grpo.warmup.eval_prompts if grpo.warmup.enabled else 0)


def _spec(rollout: RolloutConfig, model_path: str, *, dtype: str, lora_rank: int | None, max_model_len: int,
          seed: int, completions_per_call: int | None, finetune: str | None, largest_call: int | None = None):
    from grpoflow.rollout.server import ServerSpec

    return ServerSpec(model_path=model_path, engine=resolve_engine(rollout), dtype=dtype, lora_rank=lora_rank,
                      max_model_len=max_model_len, seed=seed, gpu_memory_utilization=rollout.gpu_memory_utilization,
                      enforce_eager=rollout.enforce_eager, seed_per_prompt=rollout.seed_per_prompt,
                      completions_per_call=completions_per_call, largest_call=largest_call,
                      quantization=vllm_quantization(rollout, finetune), kv_cache_dtype=rollout.kv_cache_dtype)
