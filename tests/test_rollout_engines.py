"""Which rollout engine runs, and the errors users hit choosing one (vLLM itself runs on the GPU machine)."""

import os
import sys
import time
import types

import pytest
import torch

from grpoflow.config import ConfigError, RolloutConfig
from grpoflow.rollout.load import resolve_engine
from grpoflow.rollout.vllm import _lora_rank_slot


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def fake_vllm(monkeypatch, version: str | None):
    """vLLM importable at `version`, or not importable at all (None)."""
    import grpoflow.rollout.load as load

    monkeypatch.setattr(load, "_warned_fallback", False)
    if version is None:
        monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    else:
        monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))


def test_hf_is_used_on_a_machine_without_a_gpu():
    assert resolve_engine(RolloutConfig(engine="auto")) == "hf"
    with pytest.raises(ConfigError, match="rollout.engine: vllm needs a CUDA GPU"):
        resolve_engine(RolloutConfig(engine="vllm"))


def test_auto_falls_back_to_transformers_with_one_warning(gpu, monkeypatch, caplog):
    fake_vllm(monkeypatch, None)
    with caplog.at_level("WARNING", logger="grpoflow.rollout"):
        assert resolve_engine(RolloutConfig(engine="auto")) == "hf"
        assert resolve_engine(RolloutConfig(engine="auto")) == "hf"
    assert caplog.text.count("auto uses transformers generate") == 1


def test_asking_for_vllm_without_it_says_how_to_install(gpu, monkeypatch):
    fake_vllm(monkeypatch, None)
    with pytest.raises(ConfigError, match=r"vLLM is not installed .*pip install 'grpoflow\[gpu\]'"):
        resolve_engine(RolloutConfig(engine="vllm"))


def test_an_untested_vllm_version_is_named(gpu, monkeypatch):
    fake_vllm(monkeypatch, "0.31.2")
    with pytest.raises(ConfigError, match=r"vllm 0.31.2 is installed; grpoflow is tested with vLLM 0.26.x"):
        resolve_engine(RolloutConfig(engine="vllm"))
    assert resolve_engine(RolloutConfig(engine="auto")) == "hf"


def test_the_tested_version_is_chosen_by_auto(gpu, monkeypatch):
    fake_vllm(monkeypatch, "0.26.0")
    assert resolve_engine(RolloutConfig(engine="auto")) == "vllm"


def test_lora_rank_takes_the_smallest_vllm_slot():
    assert [_lora_rank_slot(r) for r in (4, 8, 16, 17, 64)] == [8, 8, 16, 32, 64]
    with pytest.raises(ConfigError, match="model.lora.r: 600"):
        _lora_rank_slot(600)


def test_seeded_completions_do_not_depend_on_the_rest_of_the_batch(tiny_model):
    """What makes a 2-process run draw a 1-process run's completions: a prompt's samples come
    from its own seed, alone or batched with other (longer: more left padding) prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpoflow.rollout import SamplingParams
    from grpoflow.rollout.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    engine = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model), batch_size=8, progress=False)
    prompts = [[{"role": "user", "content": "Count the sheep in the long meadow by the river, please."}],
               [{"role": "user", "content": "Hi."}]]
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, logprobs=True)
    together = engine.generate(prompts, params, seeds=[11, 22])
    alone = engine.generate(prompts[1:], params, seeds=[22])
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]
    assert len({tuple(c.token_ids) for c in together[1]}) > 1  # the n rows of a prompt differ
    assert together[1][0].logprobs == pytest.approx(alone[0][0].logprobs, abs=1e-5)
    other = engine.generate(prompts[1:], params, seeds=[23])
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in alone[0]]


def test_seeded_sampling_draws_from_the_processed_distribution():
    from grpoflow.rollout import SamplingParams
    from grpoflow.rollout.seeded import SeededSampling

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    sampler = SeededSampling([1, 2], SamplingParams(n=2000, temperature=0.7, top_k=4), torch.device("cpu"))
    chosen = sampler(None, logits.expand(4000, 5).clone()).argmax(-1)  # [4000]: one-hot rows
    expected = torch.softmax(torch.where(logits >= 0.0, logits / 0.7, float("-inf")), -1)  # top 4 of 5
    assert torch.allclose(torch.bincount(chosen, minlength=5) / 4000.0, expected, atol=0.025)
    assert torch.allclose(sampler.logprobs[0], expected.log()[chosen])


class _RecordingLLM:
    """vllm.LLM's surface that VLLMEngine uses: records what it was given, one empty completion a request."""

    SAMPLE_SECONDS = 0.05  # how long a generate call takes: the engine's "sample" phase must contain it

    def __init__(self, **kwargs):
        self.kwargs, self.sampling = kwargs, None

    def generate(self, requests, sampling, **_):
        self.sampling = sampling
        time.sleep(self.SAMPLE_SECONDS)
        done = types.SimpleNamespace(token_ids=[], logprobs=[], finish_reason="length")
        return [types.SimpleNamespace(outputs=[done] * s.n) for s in sampling]


def _recording_engine(monkeypatch, tiny_model, *, world_size: int, rank: int, seed_per_prompt: bool,
                      batch: int | None = None):
    from grpoflow.rollout.vllm import VLLMEngine
    from transformers import AutoTokenizer

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        __version__="0.26.0", LLM=_RecordingLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(rank))
    return VLLMEngine(str(tiny_model), AutoTokenizer.from_pretrained(tiny_model), dtype="bfloat16",
                      gpu_memory_utilization=0.3, max_model_len=256, seed=7, sleep=False,
                      seed_per_prompt=seed_per_prompt, completions_per_call=batch)


@pytest.mark.parametrize("seed_per_prompt", [False, True])
def test_vllm_under_torchrun_runs_in_the_launchers_group_with_a_seed_per_rank(monkeypatch, tiny_model,
                                                                               seed_per_prompt):
    from grpoflow.rollout.base import SamplingParams

    engine = _recording_engine(monkeypatch, tiny_model, world_size=2, rank=1, seed_per_prompt=seed_per_prompt)
    assert engine.llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.llm.kwargs["seed"] == 8  # seed + rank: the ranks draw different noise
    prompts = [[{"role": "user", "content": q}] for q in ("one", "two")]
    groups = engine.generate(prompts, SamplingParams(max_tokens=4, n=3), seeds=[101, 202])
    assert [len(g) for g in groups] == [3, 3]
    # seeded requests cost vLLM a draw per request and step: only when asked for
    assert [s.seed for s in engine.llm.sampling] == ([101, 202] if seed_per_prompt else [None, None])


def test_vllm_in_one_process_keeps_its_own_executor_and_the_run_seed(monkeypatch, tiny_model):
    engine = _recording_engine(monkeypatch, tiny_model, world_size=1, rank=0, seed_per_prompt=False)
    assert "distributed_executor_backend" not in engine.llm.kwargs
    assert engine.llm.kwargs["seed"] == 7


def test_vllm_logs_go_to_stderr_keeping_stdout_for_the_json_result(gpu, monkeypatch):
    """vLLM configures its logger to stdout when imported; `grpoflow train | jq` needs stdout clean"""
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    fake_vllm(monkeypatch, "0.26.0")
    resolve_engine(RolloutConfig(engine="vllm"))
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"


def test_vllm_is_sized_to_run_the_whole_generation_at_once_on_cuda_graphs(monkeypatch, tiny_model):
    from grpoflow.rollout.vllm import _batch_limits

    def graphs(limits):
        return limits["compilation_config"]["max_cudagraph_capture_size"]

    assert _batch_limits(None, False) == {}  # evaluation: vLLM's defaults
    # graphs only up to the calls the run makes: 8 completions replay the graph of 8, not of 512
    assert _batch_limits(8, False) == {"compilation_config": {"max_cudagraph_capture_size": 8}}
    assert [graphs(_batch_limits(n, False)) for n in (1, 2, 3, 5, 64, 250, 256, 257)] == [1, 2, 4, 8, 64, 256, 256, 272]
    assert _batch_limits(8, True) == {}  # eager: no graphs to capture
    # evaluation during training asks for more than a generation: graphs and max_num_seqs hold it
    assert graphs(_batch_limits(8, False, largest=32)) == 32
    assert _batch_limits(256, False, largest=300)["max_num_seqs"] == 300
    assert _batch_limits(1000, False) == {"max_num_seqs": 1000,
                                          "compilation_config": {"max_cudagraph_capture_size": 1008}}
    assert _batch_limits(1000, True) == {"max_num_seqs": 1000}
    assert graphs(_batch_limits(10_000, False)) == 2048  # more would make start-up long
    engine = _recording_engine(monkeypatch, tiny_model, world_size=1, rank=0, seed_per_prompt=False, batch=1024)
    assert engine.llm.kwargs["max_num_seqs"] == 1024
    assert engine.llm.kwargs["compilation_config"] == {"max_cudagraph_capture_size": 1024}


def test_a_training_engine_captures_graphs_for_its_largest_call(monkeypatch, gpu, tiny_model):
    from grpoflow.config import validate_config
    from grpoflow.rollout.load import largest_call_for, make_engine, server_spec

    cfg = validate_config({"grpo": {"warmup": {"enabled": False}}})
    assert largest_call_for(cfg.grpo, 16) == 16
    cfg = validate_config({"grpo": {"eval_strategy": "steps", "eval_prompts": 48}})
    assert largest_call_for(cfg.grpo, 16) == 48  # the held-out questions go in one call
    assert largest_call_for(cfg.grpo, 64) == 64
    cfg = validate_config({"grpo": {"warmup": {"enabled": True, "eval_prompts": 24}}})
    assert largest_call_for(cfg.grpo, 16) == 24  # the warm-up's format check before and after
    dynamic = validate_config({"grpo": {"dynamic_sampling": True, "warmup": {"enabled": False}}})
    assert largest_call_for(dynamic.grpo, 16) == 128  # a refill draws up to 8x the groups still missing
    # what the engine is started with, colocated and as a rollout server's spec
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        __version__="0.26.0", LLM=_RecordingLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**30, 2**31))
    engine = make_engine(RolloutConfig(engine="vllm"), str(tiny_model), max_model_len=256, completions_per_call=16,
                         largest_call=largest_call_for(cfg.grpo, 16))
    assert engine.llm.kwargs["compilation_config"] == {"max_cudagraph_capture_size": 24}
    cfg = validate_config({"rollout": {"engine": "vllm"}, "grpo": {"eval_strategy": "steps", "eval_prompts": 48,
                                                                   "per_device_train_batch_size": 16}})
    spec = server_spec(cfg, str(tiny_model), num_processes=1)
    assert (spec.completions_per_call, spec.largest_call) == (16, 48)


@pytest.mark.parametrize("finetune, quantization, kv_cache_dtype, expected", [
    ("qlora", "auto", "auto", {"quantization": "bitsandbytes"}),  # vLLM's base in nf4, as the trainer's
    ("lora", "auto", "fp8", {"kv_cache_dtype": "fp8"}),
    ("lora", "bitsandbytes", "auto", {"quantization": "bitsandbytes"}),
    ("qlora", "none", "auto", {}),  # vLLM keeps the bf16 checkpoint
    (None, "auto", "auto", {}),  # evaluation: the model as saved
])
def test_vllm_loads_4_bit_weights_for_qlora_and_an_fp8_kv_cache_when_asked(monkeypatch, gpu, tiny_model, finetune,
                                                                          quantization, kv_cache_dtype, expected):
    from grpoflow.rollout.load import make_engine

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        __version__="0.26.0", LLM=_RecordingLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**30, 2**31))
    rollout = RolloutConfig(engine="vllm", quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    engine = make_engine(rollout, str(tiny_model), max_model_len=256, finetune=finetune)
    assert {k: engine.llm.kwargs[k] for k in ("quantization", "kv_cache_dtype") if k in engine.llm.kwargs} == expected


def test_only_a_colocated_unsharded_lora_run_on_vllm_shares_its_base_weights(monkeypatch, gpu):
    from grpoflow.config import validate_config
    from grpoflow.rollout.load import shares_base_weights

    fake_vllm(monkeypatch, "0.26.0")

    def shares(**sections) -> bool:
        raw = {"model": {"finetune": "lora"}, "rollout": {"engine": "vllm"}}
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value}
        return shares_base_weights(validate_config(raw, "test"))

    assert shares()
    assert not shares(model={"finetune": "full"}) and not shares(model={"finetune": "qlora"})
    assert not shares(rollout={"share_weights": False}) and not shares(rollout={"engine": "hf"})
    assert not shares(rollout={"placement": "server"}) and not shares(grpo={"distributed": "fsdp"})


def test_a_rollout_server_for_a_qlora_run_loads_its_weights_in_4_bits(tiny_model):
    from grpoflow.config import validate_config
    from grpoflow.rollout.load import server_spec

    cfg = validate_config({"model": {"finetune": "qlora"}, "rollout": {"kv_cache_dtype": "fp8"}}, "test")
    spec = server_spec(cfg, str(tiny_model), num_processes=1)
    assert (spec.quantization, spec.kv_cache_dtype) == ("bitsandbytes", "fp8")
    assert server_spec(validate_config({}, "test"), str(tiny_model), 1).quantization is None  # lora: bf16


def test_sampled_logprobs_read_from_the_flat_and_the_nested_layout():
    from grpoflow.rollout.vllm import _sampled_logprobs

    tokens = [5, 9, 5]
    flat = types.SimpleNamespace(token_ids=[5, 9, 5], logprobs=[-0.5, -1.25, -2.0])  # FlatLogprobs' lists
    nested = [{t: types.SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, flat.logprobs)]
    assert _sampled_logprobs(flat, tokens) == _sampled_logprobs(nested, tokens) == [-0.5, -1.25, -2.0]


def test_vllm_generate_asks_for_flat_logprobs_and_times_its_phases(monkeypatch, tiny_model):
    from grpoflow.rollout.base import SamplingParams

    engine = _recording_engine(monkeypatch, tiny_model, world_size=1, rank=0, seed_per_prompt=False)
    start = time.perf_counter()
    engine.generate([[{"role": "user", "content": "one"}]], SamplingParams(max_tokens=4, n=2, logprobs=True))
    elapsed = time.perf_counter() - start
    assert [(s.logprobs, s.flat_logprobs, s.detokenize) for s in engine.llm.sampling] == [(0, True, False)]
    assert set(engine.timings) == {"wake_up", "prepare", "sample", "decode"}
    # the phases are vLLM's call (sample) and what surrounds it, inside the whole call, none counted twice
    assert _RecordingLLM.SAMPLE_SECONDS <= engine.timings["sample"] < _RecordingLLM.SAMPLE_SECONDS + 0.5
    assert all(v >= 0 for v in engine.timings.values()) and sum(engine.timings.values()) <= elapsed


# vLLM 0.26's words when another process frees GPU memory during its start-up profiling (seen on an
# H200 on 2026-12-05, with three colocated runs on one card)
RACE = ("Error in memory profiling. Initial free memory 104.8 GiB, current free memory 121.5 GiB. This happens "
        "when other processes sharing the same container release GPU memory while vLLM is profiling")


class _FlakyLLM:
    """vllm.LLM that fails with the given errors, one per try, then starts."""
    errors: list = []
    tries = 0

    def __init__(self, **kwargs):
        type(self).tries += 1
        if type(self).errors:
            raise type(self).errors.pop(0)
        self.kwargs = kwargs


def _start(monkeypatch, errors: list, caplog=None):
    from grpoflow.rollout import vllm as engine

    waits = []
    monkeypatch.setattr(engine.time, "sleep", waits.append)
    monkeypatch.setattr(_FlakyLLM, "errors", list(errors))
    monkeypatch.setattr(_FlakyLLM, "tries", 0)
    llm = engine._start_llm(types.SimpleNamespace(LLM=_FlakyLLM),
                            {"max_model_len": 768, "gpu_memory_utilization": 0.1})
    return llm, waits


def test_vllm_starts_again_when_another_process_changed_the_cards_memory_while_it_measured(monkeypatch, caplog):
    llm, waits = _start(monkeypatch, [AssertionError(RACE), AssertionError(RACE)])
    assert isinstance(llm, _FlakyLLM) and _FlakyLLM.tries == 3
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 15  # backing off, apart from a twin started alongside
    assert caplog.text.count("another process on this GPU free memory") == 2


def test_vllm_that_keeps_losing_the_race_says_so_not_that_memory_is_short(monkeypatch):
    from grpoflow.errors import EngineError

    with pytest.raises(EngineError) as e:
        _start(monkeypatch, [AssertionError(RACE)] * 3)
    assert "3 times, another process on this GPU changed its memory use" in str(e.value)
    assert "CUDA_VISIBLE_DEVICES" in str(e.value) and "max_model_len" not in str(e.value)
    assert _FlakyLLM.tries == 3
    # a retry that fails some other way (state the failed start left behind) still reports the race
    with pytest.raises(EngineError, match="another process on this GPU"):
        _start(monkeypatch, [AssertionError(RACE), RuntimeError("process group already initialised")])


def test_vllm_short_of_memory_is_not_tried_again_and_names_the_keys(monkeypatch):
    from grpoflow.errors import EngineError

    with pytest.raises(EngineError, match=r"max_model_len \(768\) or raise rollout.gpu_memory_utilization \(0.1\)"):
        _start(monkeypatch, [ValueError("No available memory for the cache blocks")])
    assert _FlakyLLM.tries == 1
    with pytest.raises(KeyError):  # not ours to rephrase
        _start(monkeypatch, [KeyError("model_type")])


def test_vllms_start_leaves_the_root_logger_as_it_was(monkeypatch):
    """vLLM's start gave the root logger a handler (GPU, 2026-12-05): grpoflow's records came out twice"""
    import logging

    root = logging.getLogger()
    before, level = list(root.handlers), root.level

    class RootGrabbingLLM:
        def __init__(self, **kwargs):
            root.addHandler(logging.StreamHandler())  # what logging.basicConfig does on a bare root
            root.setLevel(logging.INFO)

    from grpoflow.rollout import vllm as engine

    engine._start_llm(types.SimpleNamespace(LLM=RootGrabbingLLM), {})
    assert root.handlers == before and root.level == level
