"""How much of the card vLLM needs: its weights, the KV cache of every completion of a generate call
at once, and a margin for its activations, sampler and CUDA graphs (rollout.gpu_memory_utilization: auto).

    need = vllm_need(config, sequences=8, max_model_len=20_128, dtype="bfloat16")
    need.total / 2**30   # 37.6 GiB for the Llama-3.1-8B shape: 15.0 weights, 19.7 KV cache, 3.0 margin
                         # (the margin: 3 GiB, or more for a wider MLP, whose activations vLLM's profile holds)

Less than this and vLLM runs part of the completions and holds the rest back, or recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# vLLM's peak activation (1.95 GiB) and CUDA graphs (0.41 GiB for the 5 sizes of 8 completions), its non-torch
# memory (-0.83 GiB: freed below its start), as its log counted them for the Llama-3.1-8B shape in nf4 (H100,
# 2026-12-06); the rest is slack. More margin is not wasted memory only in name: vLLM turns all of it into KV cache.
MARGIN_BYTES = 3 * GIB
# The activation peak of vLLM's profiling forward grows with the MLP's width: 1.77 GiB for the Llama-3.1-8B shape
# (MLP 14,336) and 2.99 GiB for the Qwen3-32B shape (MLP 25,600), both bf16 with LoRA, as vLLM's log counted them
# (H100, 2026-12-06), about 128 KiB per unit of width. The 32B's whole overhead, 3.32 GiB with its graphs and
# non-torch memory, passed the flat 3 GiB, and its KV cache came out 4,000 tokens short of 8 completions.
ACTIVATION_BYTES_PER_MLP_UNIT = 128 * 1024
OVERHEAD_BYTES = 1 * GIB  # CUDA graphs, non-torch memory and slack beside that activation peak
KV_BLOCK = 64  # tokens: the KV cache comes in blocks (16 in vLLM's usual backends; 64 covers the largest),
# so a sequence takes its length rounded up to whole blocks
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": None, "fp8": 1}


@dataclass(frozen=True)
class VLLMNeed:
    weights: int
    kv_cache: int
    margin: int = MARGIN_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.margin

    def describe(self) -> str:
        return (f"{self.total / GIB:.1f} GiB: weights {self.weights / GIB:.1f}, KV cache {self.kv_cache / GIB:.1f}, "
                f"margin {self.margin / GIB:.1f}")


def vllm_need(config, *, sequences: int, max_model_len: int, dtype: str = "bfloat16", quantized: bool = False,
              kv_cache_dtype: str = "auto") -> VLLMNeed:
    """config: the model's (a transformers config, or its config.json as a dict). quantized: the
    linears of the decoder layers in 4 bits as bitsandbytes stores them (nf4 and an fp32 scale per 64);
    embeddings and the head stay in `dtype`."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    layers, hidden = get("num_hidden_layers"), get("hidden_size")
    heads, kv_heads = get("num_attention_heads"), get("num_key_value_heads") or get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    linears = layers * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                        + 3 * hidden * get("intermediate_size"))
    embeddings = get("vocab_size") * hidden * (1 if get("tie_word_embeddings", False) else 2)
    size = _BYTES[dtype]
    weights = embeddings * size + linears * ((0.5 + 4 / 64) if quantized else size)
    kv_size = _BYTES[kv_cache_dtype] or size
    kv = sequences * -(-max_model_len // KV_BLOCK) * KV_BLOCK * layers * 2 * kv_heads * head_dim * kv_size
    margin = max(MARGIN_BYTES, OVERHEAD_BYTES + ACTIVATION_BYTES_PER_MLP_UNIT * get("intermediate_size"))
    return VLLMNeed(weights=int(weights), kv_cache=int(kv), margin=margin)
