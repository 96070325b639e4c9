"""The vLLM engine on a GPU: weight sync (full and LoRA) reaches generation, and standby.

Runs on the GPU machine with vLLM 0.26 and a SmolLM2 folder (GRPOFLOW_GPU_MODEL, default
/tmp/smollm2); skipped anywhere else. vLLM's sleep-mode allocator allows one engine per process,
so each test runs in a pytest process of its own (`make test-gpu` does, one test id at a time).
Measured on an H100 on 2026-11-26: see benchmarks/RESULTS.md.
"""

import logging
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


def policy_and_engine(finetune: str, **engine):
    pytest.importorskip("vllm")
    from grpoflow.config import validate_config
    from grpoflow.rollout.vllm import VLLMEngine
    from grpoflow.train.policy import load_policy

    cfg = validate_config({"model": {"finetune": finetune, "dtype": "bfloat16"},
                           "grpo": {"gradient_checkpointing": False}})
    policy = load_policy(cfg.model, cfg.grpo, MODEL)
    engine = VLLMEngine(MODEL, policy.tokenizer, dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=1024,
                        seed=0, lora_rank=cfg.model.lora.r if finetune in ("lora", "qlora") else None, sleep=True,
                        enforce_eager=True, **engine)
    return policy, engine


def train_adapters(policy) -> None:
    """Trained adapters, exaggerated: every LoRA B matrix away from its zero start."""
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


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
    train_adapters(policy)
    stale, _ = vllm_vs_trainer(policy, engine)
    engine.sync_weights(policy, step=1)
    after, _ = vllm_vs_trainer(policy, engine)
    print(f"lora: |dlogp| stale {stale:.4f}, after handing the adapters over {after:.4f}")
    assert stale > 5 * after and after < 0.1


def test_qlora_adapters_reach_a_vllm_holding_the_same_4_bit_base(caplog):
    """rollout.quantization auto for QLoRA: vLLM quantizes the checkpoint to nf4 as it loads (double
    quantized, blocks of 64, as transformers quantizes the trainer's base), so the sampler and the
    trainer run one 4-bit model, held once (share_weights); the adapters handed over reach generation."""
    pytest.importorskip("bitsandbytes")
    from grpoflow.private_api import vllm_model

    policy, engine = policy_and_engine("qlora", quantization="bitsandbytes")
    assert engine.llm.llm_engine.vllm_config.model_config.quantization == "bitsandbytes"
    # what is not 4-bit stays in the compute dtype, as in vLLM: no float32 embeddings, lm_head or norms
    kept = {p.dtype for name, p in policy.model.named_parameters() if "lora_" not in name and p.is_floating_point()}
    assert kept == {torch.bfloat16}
    # the same checkpoint packed to nf4 on both sides (vLLM from its float32, the trainer from its bf16 cast):
    # every 4-bit weight of the trainer becomes rows of vLLM's, with vLLM's scales, one 4-bit model held once
    four_bit = [p for p in policy.model.parameters() if type(p).__name__ == "Params4bit"]
    caplog.set_level(logging.INFO, logger="grpoflow")
    saved = engine.share_weights(policy)
    storage = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
               for t in vllm_model(engine.llm).parameters()]
    # on failure: why share_weights kept them, and what vLLM's first layer holds
    layer = [(n, p.dtype, tuple(p.shape)) for n, p in vllm_model(engine.llm).named_parameters() if ".0." in n]
    why = [r.getMessage() for r in caplog.records if "share" in r.getMessage()]
    assert four_bit and all(any(low <= p.data_ptr() < high for low, high in storage) for p in four_bit), (why, layer)
    assert saved >= sum(p.numel() for p in four_bit)
    engine.sync_weights(policy, step=0)
    base, _ = vllm_vs_trainer(policy, engine)
    train_adapters(policy)
    stale, _ = vllm_vs_trainer(policy, engine)
    engine.sync_weights(policy, step=1)
    after, _ = vllm_vs_trainer(policy, engine)
    print(f"qlora: |dlogp| before training {base:.4f}, stale adapters {stale:.4f}, handed over {after:.4f}; "
          f"vLLM took {engine.device_bytes / 2**30:.2f} GiB, shares {saved / 2**30:.3f} GiB with the trainer")
    assert base < 0.1 and stale > 5 * after and after < 0.1


def test_standby_releases_the_kv_cache_and_takes_it_back_fast():
    """Full fine-tuning: level-2 sleep releases weights and KV cache; the next sync rewrites the
    weights, so a cycle is sleep + wake + sync."""
    from grpoflow.rollout.vllm import EngineError

    policy, engine = policy_and_engine("full")
    vllm_vs_trainer(policy, engine)
    torch.cuda.synchronize()
    used = torch.cuda.mem_get_info()
    cycles, syncs = [], []
    for _ in range(3):
        started = time.perf_counter()
        engine.sleep()
        asleep = torch.cuda.mem_get_info()
        engine.wake_up({"weights", "kv_cache"})
        cycles.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.sync_weights(policy, step=1)
        syncs.append(time.perf_counter() - started)
    freed_gib = (asleep[0] - used[0]) / 2**30
    print(f"standby: {freed_gib:.2f} GiB freed while asleep; sleep + wake {[round(c, 3) for c in cycles]} s, "
          f"then sync {[round(c, 3) for c in syncs]} s")
    assert freed_gib > 1.0 and max(cycles[1:]) + max(syncs[1:]) <= 1.0
    after, _ = vllm_vs_trainer(policy, engine)
    assert after < 0.1 and not math.isnan(after)  # still the same model after the cycles
    engine.sleep()
    with pytest.raises(EngineError, match="sync_weights"):  # released weights are never sampled from
        vllm_vs_trainer(policy, engine)


def test_shared_base_weights_are_one_copy_and_adapters_still_reach_generation():
    """LoRA: the policy's frozen base weights become views of vLLM's tensors (one copy on the
    card); standby then releases only the KV cache, and training through the shared weights works."""
    from grpoflow.private_api import vllm_model

    policy, engine = policy_and_engine("lora")
    base = [p for p in policy.model.parameters() if not p.requires_grad]
    base_bytes = sum(p.numel() * p.element_size() for p in base)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    saved = engine.share_weights(policy)
    free_after = torch.cuda.mem_get_info()[0]
    print(f"shared: {saved / 2**20:.1f} MiB of {base_bytes / 2**20:.1f} MiB of base weights; "
          f"free memory +{(free_after - free_before) / 2**20:.1f} MiB")
    assert saved > 0.9 * base_bytes and free_after - free_before > 0.8 * saved
    q = policy.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    vllm_ptrs = {p.untyped_storage().data_ptr() for p in vllm_model(engine.llm).parameters()}
    assert q.untyped_storage().data_ptr() in vllm_ptrs

    train_adapters(policy)
    engine.sync_weights(policy, step=1)
    before_sleep = torch.cuda.mem_get_info()[0]
    engine.sleep()
    freed_gib = (torch.cuda.mem_get_info()[0] - before_sleep) / 2**30
    snapshot = q.detach().clone()
    ids = torch.tensor([[1, 2, 3, 4, 5]], device=policy.device)  # the trainer works while vLLM sleeps
    with policy.autocast():
        policy.model(input_ids=ids).logits.float().mean().backward()
    assert torch.equal(q, snapshot) and q.grad is None
    after, _ = vllm_vs_trainer(policy, engine)  # wakes the KV cache
    print(f"shared: standby freed {freed_gib:.2f} GiB (KV cache only); |dlogp| after the hand-over {after:.4f}")
    assert freed_gib > 1.0 and after < 0.1


def test_evaluation_engine_applies_a_saved_adapters_folder(tmp_path):
    """The evaluate stage's engine (make_engine without a policy) given a LoRA run's output folder: vLLM loads the
    base it names and applies the adapters; its log-probs match transformers + peft."""
    pytest.importorskip("vllm")
    from grpoflow.config import RolloutConfig, validate_config
    from grpoflow.rollout.load import make_engine
    from grpoflow.train.policy import load_policy

    cfg = validate_config({"model": {"finetune": "lora", "dtype": "bfloat16"}, "grpo": {"gradient_checkpointing": False}})
    policy = load_policy(cfg.model, cfg.grpo, MODEL)
    train_adapters(policy)
    policy.model.save_pretrained(tmp_path / "adapters")
    policy.tokenizer.save_pretrained(tmp_path / "adapters")
    engine = make_engine(RolloutConfig(engine="vllm", gpu_memory_utilization=0.2, enforce_eager=True),
                         str(tmp_path / "adapters"), max_model_len=1024 + 24)
    assert engine.name == "vllm" and engine.lora_request is not None
    after, groups = vllm_vs_trainer(policy, engine)
    print(f"evaluation engine with adapters: |dlogp| vs transformers + peft {after:.4f}")
    assert after < 0.1 and all(len(c.token_ids) > 0 for (c,) in groups)


def short_run(tmp_path, finetune: str, rollout: dict, steps: int = 4) -> list[dict]:
    """A few GRPO steps with the vLLM engine on 32 made-up prompts; the metrics of each step."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from grpoflow.config import validate_config
    from stages.train import run_train

    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Write a sentence about the number {i}."}],
             "question": f"number {i}", "answer": str(i), "solution": None, "origin": f"t:{i}", "metadata": None}
            for i in range(32)]
    train, heldout = tmp_path / "train.parquet", tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(rows), train)
    pq.write_table(pa.Table.from_pylist(rows[:4]), heldout)
    (tmp_path / "r.py").write_text("def spaces(prompts, completions, **_):\n"
                                   "    return [t.count(' ') / max(1, len(t)) for t in completions]\n")
    cfg = validate_config({
        "model": {"finetune": finetune, "dtype": "bfloat16"},
        "rollout": {"engine": "vllm", "enforce_eager": True, **rollout},
        "grpo": {"max_steps": steps, "num_generations": 4, "per_device_train_batch_size": 16,
                 "max_completion_length": 32, "learning_rate": 1e-5, "reward_funcs": [f"{tmp_path / 'r.py'}:spaces"],
                 "warmup": {"enabled": False}, "save_steps": 100, "output_dir": str(tmp_path / "train")}})
    result = run_train(cfg, train, heldout, MODEL, progress=False)
    return [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_generation_in_the_rollout_thread_runs_beside_the_trainers_busy_stream():
    """Async rollouts: vLLM on the generation's stream (use_stream) decodes while the trainer's stream
    is busy. Without it, vLLM 0.26's model runner put the rollout thread back on the stream of the
    thread that first generated (the trainer's) after one step, and decoding waited for all of it."""
    import threading

    from grpoflow.private_api import vllm_worker
    from grpoflow.rollout import SamplingParams

    policy, engine = policy_and_engine("full")
    engine.sync_weights(policy, step=0)
    engine.generate(PROMPTS, SamplingParams(max_tokens=8))  # the first caller: this thread
    stream = torch.cuda.Stream()
    engine.use_stream(stream)
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=0)

    def timed_in_a_thread() -> float:
        took = []

        def generate():  # as the rollout thread does: on the generation's stream from the start
            started = time.perf_counter()
            with torch.cuda.stream(stream):
                engine.generate(PROMPTS, params)
            took.append(time.perf_counter() - started)

        thread = threading.Thread(target=generate)
        thread.start()
        thread.join()
        return took[0]

    alone = timed_in_a_thread()
    torch.cuda._sleep(3_000_000_000)  # the trainer's stream busy for about 1.5-2 s (3e9 clock cycles)
    busy = timed_in_a_thread()
    torch.cuda.synchronize()
    print(f"generation alone {alone:.2f}s, beside a busy trainer's stream {busy:.2f}s")
    assert vllm_worker(engine.llm).model_runner.main_stream is stream
    assert busy < alone + 0.5  # it waited for none of the trainer's stream


@pytest.mark.parametrize("finetune, priority", [("full", "normal"), ("lora", "high")])
def test_async_rollouts_sample_ahead_with_vllm_while_the_trainer_trains(tmp_path, finetune, priority):
    """rollout.mode async on the vLLM engine: the next generation is sampled in the rollout thread
    (a CUDA stream of its own, of high priority with rollout.async_priority) while this one trains;
    its samples are one step old and the loss weighs them with vLLM's own log-probs."""
    pytest.importorskip("vllm")
    steps = short_run(tmp_path, finetune, {"mode": "async", "gpu_memory_utilization": 0.2,
                                           "async_priority": priority})
    print("async vLLM:", [(m["step"], round(m["step_seconds"], 3), round(m["rollout/wait_seconds"], 3),
                           round(m["sampling/sampling_logp_difference/mean"], 4)) for m in steps])
    assert [m["rollout/staleness"] for m in steps] == [0, 1, 1, 1]
    for m in steps:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        assert m["sampling/sampling_logp_difference/mean"] < 0.5  # the engine sampled this policy, one step old


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_full_weights_pushed_over_cuda_ipc_reach_a_server_on_the_same_card(engine, caplog):
    """A rollout server on the trainer's card maps the trainer's own tensors (CUDA IPC) once and
    reads them again at every push: weights changed in place reach its generation, and a second push
    sends no handles."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    import logging

    from grpoflow.config import validate_config
    from grpoflow.rollout.server import ServerEngine, ServerSpec, start_server
    from grpoflow.train.policy import load_policy

    cfg = validate_config({"model": {"finetune": "full", "dtype": "bfloat16"}, "grpo": {"gradient_checkpointing": False}})
    policy = load_policy(cfg.model, cfg.grpo, MODEL)
    started = start_server(ServerSpec(model_path=MODEL, engine=engine, gpu_memory_utilization=0.2, enforce_eager=True),
                           gpus=[], timeout=300)
    try:
        with caplog.at_level(logging.INFO, logger="grpoflow.rollout"):
            server = ServerEngine(started.address, started.key, policy.tokenizer, rank=0, session="ipc", timeout=300,
                                  retries=0, push=True)
        assert server.backend == "ipc" and "weights over ipc" in caplog.text
        timings = []
        for step, scale in ((1, 1.0), (2, -1.0), (3, 0.5)):
            with torch.no_grad():  # an optimizer step, exaggerated, in place: the tensors do not move
                policy.model.model.layers[3].mlp.down_proj.weight.mul_(scale)
            started_push = time.perf_counter()
            server.sync_weights(policy, step)
            timings.append(time.perf_counter() - started_push)
            after, _ = vllm_vs_trainer(policy, server)
            print(f"{engine} server, push {step} by reference in {timings[-1]:.3f}s: |dlogp| {after:.4f}")
            assert after < 0.1  # a server still sampling the previous weights is far off (test above: > 5x)
            if step == 1:
                first = server._shared
            assert server._shared is first  # the handles sent at step 1, not sent again
        server.close()
    finally:
        started.close()


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_rollout_server_on_the_trainers_card(tmp_path, finetune):
    """rollout.placement server with the server on the trainer's own card (one GPU): full weights are
    read in place over CUDA IPC, LoRA goes as adapter files; vLLM's log-probs of the pushed weights
    agree with the trainer's."""
    pytest.importorskip("vllm")
    steps = short_run(tmp_path, finetune, {"placement": "server", "gpu_memory_utilization": 0.2})
    print(f"rollout server, one card, {finetune}:", [(m["step"], round(m["step_seconds"], 3),
                                                     round(m["time/rollout_server_seconds"], 3),
                                                     round(m["sampling/sampling_logp_difference/mean"], 4)) for m in steps])
    for m in steps:
        assert math.isfinite(m["loss"]) and m["sampling/sampling_logp_difference/mean"] < 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_rollout_server_on_a_gpu_of_its_own_gets_the_weights_over_nccl(tmp_path, caplog):
    pytest.importorskip("vllm")
    import logging

    with caplog.at_level(logging.INFO, logger="grpoflow.rollout"):
        steps = short_run(tmp_path, "full", {"placement": "server", "gpu_memory_utilization": 0.5,
                                                  "server_gpus": [1]})
    assert "weights over nccl" in caplog.text
    print("rollout server, GPU 1, full:", [(m["step"], round(m["step_seconds"], 3),
                                           round(m["time/rollout_server_seconds"], 3),
                                           round(m["sampling/sampling_logp_difference/mean"], 4)) for m in steps])
    for m in steps:
        assert math.isfinite(m["loss"]) and m["sampling/sampling_logp_difference/mean"] < 0.5
