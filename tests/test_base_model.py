"""The packaged SmolLM2 GGUF becomes a plain HF folder once, and behaves like the GGUF."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from grpoflow.base_model import PACKAGED_MODELS, ModelError, resolve_model
from grpoflow.config import ModelConfig

pytestmark = pytest.mark.slow


def test_converted_folder_matches_the_gguf(smollm2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packaged = PACKAGED_MODELS["smollm2-135m-instruct"]
    gguf_dir = Path(importlib.util.find_spec(packaged.package).submodule_search_locations[0])
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=packaged.gguf_file)
    assert gguf_tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=packaged.gguf_file, dtype=torch.float32)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert torch.equal(ours, theirs)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_second_resolve_reuses_the_conversion(smollm2: Path, model_cache: Path):
    again = resolve_model(ModelConfig(cache_dir=model_cache))
    assert Path(again.path) == smollm2 and not again.converted
    assert json.loads((smollm2 / "grpoflow.json").read_text())["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_local_folders_and_their_errors(smollm2: Path, tmp_path: Path):
    assert resolve_model(ModelConfig(name_or_path=str(smollm2))).path == str(smollm2)
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError) as e:
        resolve_model(ModelConfig(name_or_path=str(tmp_path)))
    assert str(e.value) == f"model.name_or_path: {tmp_path} has no config.json; it holds weights.gguf: set model.gguf_file"
    with pytest.raises(ModelError) as e:
        resolve_model(ModelConfig(name_or_path=str(tmp_path), gguf_file="other.gguf"))
    assert str(e.value).startswith(f"model.gguf_file: other.gguf not found in {tmp_path}")
    with pytest.raises(ModelError, match="model.name_or_path: ./missing does not exist"):
        resolve_model(ModelConfig(name_or_path="./missing"))
    # a Hub id is left for transformers to fetch where the network allows
    assert resolve_model(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")).path == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
