"""Merging LoRA adapters into 16-bit weights: the merged model computes what base + adapters did."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpoflow.export.merge import merge_to_16bit


def trained_adapters(tiny_model, folder):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a fresh LoRA B is zero: give the adapters something to change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_merged_16bit_model_matches_base_plus_adapters(tiny_model, tmp_path, dtype):
    peft_model = trained_adapters(tiny_model, tmp_path / "final")
    merged = merge_to_16bit(tmp_path / "final", tmp_path / "export", dtype=dtype)
    assert merged.from_adapters and (merged.adapters_dir / "adapter_model.safetensors").is_file()
    config = json.loads((merged.merged_dir / "config.json").read_text())
    assert config["dtype"] == dtype and "quantization_config" not in config
    assert (merged.merged_dir / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(merged.merged_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(merged.merged_dir)
    assert model.dtype == getattr(torch, dtype)
    ids = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        expected = peft_model(ids).logits
        base_only = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        got = model.float()(ids).logits
    error = (got - expected).abs().max().item()
    assert error < 0.05 * expected.abs().max().item()  # 16-bit rounding of the weights
    assert (base_only - expected).abs().max().item() > 10 * error  # the adapters did change the model


def test_a_full_model_is_cast_and_saved(tiny_model, tmp_path):
    merged = merge_to_16bit(tiny_model, tmp_path / "export", dtype="bfloat16")
    assert not merged.from_adapters and merged.adapters_dir is None
    assert json.loads((merged.merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="export.dtype: 'float32' is not a 16-bit type"):
        merge_to_16bit(tiny_model, tmp_path / "x", dtype="float32")
