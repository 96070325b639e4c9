"""The vLLM engine on a GPU: weight sync (full and LoRA) reaches generation, and standby.

Runs on the GPU machine with vLLM 0.26 and a SmolLM2 folder (GRPOFLOW_GPU_MODEL, default
/tmp/smollm2); skipped anywhere else. vLLM's sleep-mode allocator allows one engine per process,
so each test runs in a pytest process of its own (`make test-gpu` does; or `-k full|lora|standby`).
Measured on an H100 on 2026-11-26: see benchmarks/RESULTS.md.
"""

import math
import os
import time
from pathlib import Path

import pytest
import torch

MODEL = os.environ.get("GRPOFLOW_GPU_MODEL", "/tmp/smollm2")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not Path(MODEL, "config.json").is_file(), reason=f"no model folder at {MODEL}")]

PROMPTS = [[{"role": "user", "content": "What is 12 times 7? Think step by step."}],
           [{"role": "user", "content": "Name three colours."}]]


def policy_and_engine(finetune: str):
    pytest.importorskip("vllm")
    from grpoflow.config import validate_config
    from grpoflow.rollout.vllm import VLLMEngine
    from grpoflow.train.model import load_policy

    cfg = validate_config({"model": {"finetune": finetune, "dtype": "bfloat16"},
                           "grpo": {"gradient_checkpointing": False}})
    policy = load_policy(cfg.model, cfg.grpo, MODEL)
    engine = VLLMEngine(MODEL, policy.tokenizer, dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=1024,
                        seed=0, lora_rank=cfg.model.lora.r if finetune == "lora" else None, sleep=True,
                        enforce_eager=True)
    return policy, engine


def vllm_vs_trainer(policy, engine) -> tuple[float, list]:
    """Mean |vLLM log-prob - trainer log-prob| over sampled completions of PROMPTS."""
    from grpoflow.rollout import SamplingParams
    from grpoflow.train.logps import completion_logps

    groups = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=1.0, seed=0, logprobs=True))
    diffs = []
    for (c,) in groups:
        ids = torch.tensor([c.prompt_ids + c.token_ids], device=policy.device)
        with torch.no_grad(), policy.autocast():
            mine, _ = completion_logps(policy.model, ids, torch.ones_like(ids), len(c.token_ids), temperature=1.0)
        diffs += [abs(a - b) for a, b in zip(mine[0].tolist(), c.logprobs)]
    return sum(diffs) / len(diffs), groups


def test_full_weights_synced_in_place_reach_generation():
    policy, engine = policy_and_engine("full")
    before, _ = vllm_vs_trainer(policy, engine)
    assert before < 0.1  # bf16 noise between two implementations of one model
    with torch.no_grad():  # an optimizer step, exaggerated: every MLP output of layer 3 changes
        policy.model.model.layers[3].mlp.down_proj.weight.mul_(-1.0)
    stale, _ = vllm_vs_trainer(policy, engine)  # not synced yet: vLLM still samples the old model
    engine.sleep()
    started = time.perf_counter()
    engine.sync_weights(policy, step=1)
    sync_s = time.perf_counter() - started
    after, _ = vllm_vs_trainer(policy, engine)
    print(f"full: |dlogp| before {before:.4f}, stale {stale:.4f}, after sync {after:.4f}; sync {sync_s:.2f}s")
    assert stale > 5 * after and after < 0.1


def test_lora_adapters_handed_over_reach_generation():
    policy, engine = policy_and_engine("lora")
    with torch.no_grad():  # trained adapters, exaggerated
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    stale, _ = vllm_vs_trainer(policy, engine)
    engine.sync_weights(policy, step=1)
    after, _ = vllm_vs_trainer(policy, engine)
    print(f"lora: |dlogp| stale {stale:.4f}, after handing the adapters over {after:.4f}")
    assert stale > 5 * after and after < 0.1


def test_standby_releases_the_kv_cache_and_takes_it_back_fast():
    policy, engine = policy_and_engine("full")
    vllm_vs_trainer(policy, engine)
    torch.cuda.synchronize()
    used = torch.cuda.mem_get_info()
    cycles = []
    for _ in range(3):
        started = time.perf_counter()
        engine.sleep()
        asleep = torch.cuda.mem_get_info()
        engine.wake_up({"weights", "kv_cache"})
        cycles.append(time.perf_counter() - started)
    freed_gib = (asleep[0] - used[0]) / 2**30
    print(f"standby: {freed_gib:.2f} GiB freed while asleep; sleep + wake {[round(c, 3) for c in cycles]} s")
    assert freed_gib > 1.0 and max(cycles[1:]) <= 1.0
    after, _ = vllm_vs_trainer(policy, engine)
    assert after < 0.1 and not math.isnan(after)  # still the same model after the cycles
