"""grpoflow/rollout/sizing.py: vLLM's need for rollout.gpu_memory_utilization auto, against figures
worked out by hand and the H100 run it was sized for (8 x 20,128 tokens of the Llama-3.1-8B shape:
vLLM's own log counted 15.09 GiB of weights and gave 22.5 GiB to the KV cache)."""

import sys
import types

import pytest
import torch

from grpoflow.config import ConfigError
from grpoflow.rollout.sizing import GIB, MARGIN_BYTES, vllm_need

LLAMA_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14_336, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128_256, tie_word_embeddings=False)


def test_the_8b_shape_needs_its_weights_and_every_completions_kv_cache_at_once():
    need = vllm_need(LLAMA_8B, sequences=8, max_model_len=20_128)
    # the embeddings and head, and 32 layers of q, o [4096, 4096], k, v [1024, 4096], gate, up, down: 8.03B
    # parameters in bf16 (the model has 266,240 more, its norms: half a megabyte, left out)
    assert need.weights == (2 * 128_256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14_336)) * 2
    per_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head_dim x bf16 = 128 KiB
    assert need.kv_cache == 8 * 20_160 * per_token  # each sequence in whole blocks of 64 tokens
    assert round(need.total / GIB, 1) == 37.6 and need.margin == MARGIN_BYTES == 3 * GIB
    fp8 = vllm_need(LLAMA_8B, sequences=8, max_model_len=20_128, kv_cache_dtype="fp8")
    assert fp8.kv_cache == need.kv_cache // 2 and fp8.weights == need.weights
    nf4 = vllm_need(LLAMA_8B, sequences=8, max_model_len=20_128, quantized=True)
    embeddings = 2 * 128_256 * 4096 * 2  # the embeddings and the head stay in bf16
    assert nf4.weights == int(embeddings + (need.weights - embeddings) / 2 * (0.5 + 4 / 64))


QWEN3_32B = dict(num_hidden_layers=64, hidden_size=5120, intermediate_size=25_600, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=False)


def test_a_wide_mlps_margin_holds_vllms_own_count_and_leaves_every_completions_kv_cache():
    """The Qwen3-32B shape, LoRA bf16, fp8 KV cache, 8 x 6,784 tokens (H100, 2026-12-06): vLLM's log counted
    61.35 GiB of weights, 2.99 GiB of activation peak, 0.13 GiB non-torch and 0.20 GiB of CUDA graphs. Under
    a flat 3 GiB margin it gave the KV cache 50,256 tokens where 8 completions need 54,272: 7.41 at once."""
    need = vllm_need(QWEN3_32B, sequences=8, max_model_len=6_784, kv_cache_dtype="fp8")
    assert need.kv_cache == 8 * 6_784 * 64 * 2 * 8 * 128  # layers x (K, V) x KV heads x head_dim, a byte each
    measured_overhead = (2.99 + 0.13 + 0.20) * GIB
    assert need.margin >= measured_overhead > MARGIN_BYTES
    # and the share it asks for leaves vLLM the whole KV cache over its own count of the weights
    assert need.total - 61.35 * GIB - measured_overhead >= need.kv_cache
    assert vllm_need(LLAMA_8B, sequences=8, max_model_len=20_128).margin == MARGIN_BYTES  # 8B: as measured


def test_a_transformers_config_reads_like_its_json(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    as_json = {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                "tie_word_embeddings")}
    assert vllm_need(config, sequences=4, max_model_len=64) == vllm_need(as_json, sequences=4, max_model_len=64)


class _LLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _engine(monkeypatch, tiny_model, card_gib: float, **kw):
    from transformers import AutoTokenizer

    from grpoflow.rollout.vllm import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.26.0", LLM=_LLM))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(card_gib * GIB), int(card_gib * GIB)))
    return VLLMEngine(str(tiny_model), AutoTokenizer.from_pretrained(tiny_model), dtype="bfloat16",
                      gpu_memory_utilization="auto", max_model_len=256, seed=0, sleep=False, **kw)


def test_auto_asks_vllm_for_its_need_over_the_card_and_refuses_a_card_too_small(monkeypatch, tiny_model):
    from transformers import AutoConfig

    engine = _engine(monkeypatch, tiny_model, 80.0, completions_per_call=32)
    need = vllm_need(AutoConfig.from_pretrained(tiny_model), sequences=32, max_model_len=256)
    assert engine.llm.kwargs["gpu_memory_utilization"] == round(need.total / (80 * GIB), 4)
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization auto: vLLM needs .* rollout.kv_cache_dtype"):
        _engine(monkeypatch, tiny_model, 3.0, completions_per_call=32)  # the 3 GiB margin alone fills it
