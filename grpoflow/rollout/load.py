"""Pick and build the rollout engine that `rollout.engine` names."""

from __future__ import annotations

import logging

from grpoflow.config import ConfigError, RolloutConfig
from grpoflow.rollout.hf import HFEngine

log = logging.getLogger("grpoflow.rollout")


def check_engine(cfg: RolloutConfig) -> None:
    if cfg.engine == "vllm":
        raise ConfigError("rollout.engine: the vLLM engine is not built yet (issue #6); use hf or auto")
    # auto: vLLM once it lands (issue #6); until then transformers' generate everywhere


def load_engine(cfg: RolloutConfig, model_path: str, *, batch_size: int = 16, progress: bool = True) -> HFEngine:
    check_engine(cfg)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    log.info("rollout engine: transformers generate on %s (%s)", device, str(dtype).removeprefix("torch."))
    return HFEngine(model, tokenizer, batch_size=batch_size, progress=progress)
