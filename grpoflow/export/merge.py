"""Merge trained LoRA adapters into their base and save 16-bit weights a runtime can load alone.

The merge happens in float32 and the result is cast once to the export dtype: merging in 16-bit
would round the base and the low-rank update separately. A QLoRA run trained against a 4-bit
base; its adapters are merged into the original 16/32-bit base weights (a dequantized base),
which the export report and model card say.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from grpoflow.atomic import atomic_folder

log = logging.getLogger("grpoflow.export")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Merged:
    merged_dir: Path  # 16-bit safetensors + tokenizer + chat template + generation config
    adapters_dir: Path | None  # the LoRA adapters alone (save_lora), when the run trained adapters
    base_model: str
    from_adapters: bool


def merge_to_16bit(model_dir: Path, out: Path, *, dtype: str = "bfloat16") -> Merged:
    """`model_dir`: the training stage's final folder (adapters, or a whole model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"export.dtype: {dtype!r} is not a 16-bit type; use float16 or bfloat16")
    model_dir, out = Path(model_dir), Path(out)
    adapter_config = model_dir / "adapter_config.json"
    merged_dir = out / "merged"
    adapters_dir = None
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
        adapters_dir = out / "adapters"
        with atomic_folder(adapters_dir) as tmp:
            shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("report.json"), dirs_exist_ok=True)
        log.info("merged the LoRA adapters of %s into %s", model_dir, base)
    else:
        base = str(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(model_dir if (model_dir / "tokenizer_config.json").is_file() else base)
    with atomic_folder(merged_dir) as tmp:  # a half-written folder never passes for a merged model
        model.save_pretrained(tmp)  # safetensors, config with the dtype, generation_config.json
        tokenizer.save_pretrained(tmp)  # tokenizer files and the chat template
    return Merged(merged_dir, adapters_dir, base, adapter_config.is_file())
