"""Pick and build the rollout engine that `rollout.engine` names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from grpoflow.config import ConfigError, RolloutConfig
from grpoflow.rollout.hf import HFEngine

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


def load_engine(cfg: RolloutConfig, model_path: str, *, batch_size: int = 16, progress: bool = True,
                max_tokens: int = 512, seed: int = 0):
    """An engine for evaluation: `model_path` is a model folder, a Hub id, or a LoRA adapters folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if resolve_engine(cfg) == "vllm":
        from grpoflow.rollout.vllm import VLLMEngine

        adapter_config = Path(model_path) / "adapter_config.json"
        base, rank = model_path, None
        if adapter_config.is_file():
            adapter = json.loads(adapter_config.read_text())
            base, rank = adapter["base_model_name_or_path"], adapter["r"]
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        engine = VLLMEngine(base, tokenizer, dtype="bfloat16", gpu_memory_utilization=cfg.gpu_memory_utilization,
                            max_model_len=cfg.max_model_len or 1024 + max_tokens, seed=seed, lora_rank=rank,
                            sleep=False, enforce_eager=cfg.enforce_eager)
        if rank:
            from vllm.lora.request import LoRARequest

            engine.lora_request = LoRARequest("evaluated", 1, str(model_path))
        return engine
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    log.info("rollout engine: transformers generate on %s (%s)", device, str(dtype).removeprefix("torch."))
    return HFEngine(model, tokenizer, batch_size=batch_size, progress=progress)
