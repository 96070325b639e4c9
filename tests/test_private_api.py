"""grpoflow/private_api.py's shims against CPU fakes of the vLLM and FSDP2 objects they reach into,
and VLLMEngine's sleep / wake / sync state machine driven through them.

vLLM cannot run here (no GPU, not installed): tests/fakes_private_api.py stands in for it, with the
attribute paths the shims follow and sleep mode's rules (see its docstring). Everything else is
real: the engine, a tiny policy, its tokenizer, torch's hooks. tests/test_vllm_gpu.py runs the real
vLLM on the GPU machine.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

from grpoflow.errors import EngineError
from grpoflow.private_api import (
    cuda_allocator_settings,
    fsdp_forward_hooks_off,
    load_vllm_weights,
    release_vllm_kv_cache,
    vllm_model,
    vllm_packed_modules,
    vllm_released_bytes,
    vllm_worker,
    wake_vllm_kv_cache,
)
from grpoflow.rollout.base import SamplingParams
from tests.fakes_private_api import (GENERATED, VLLM_FUSED, FakeCuMemAllocator, FakeFSDPUnit, FakeVLLMModel,
                                    install_fake_vllm, vllm_layout)

PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Name a colour."}]]
PARAMS = SamplingParams(max_tokens=4, n=2, logprobs=True)


def fake_vllm_at(monkeypatch, version: str = "0.26.0", model: FakeVLLMModel | None = None):
    """The fake vLLM installed; torch.cuda.synchronize (no CUDA here) recorded among the allocator's events."""
    fake = install_fake_vllm(monkeypatch, version, model)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: fake.allocator.events.append(("cuda.synchronize",)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return fake


@pytest.fixture
def fake_vllm(monkeypatch):
    return fake_vllm_at(monkeypatch)


def fake_llm(sleep_mode: bool = True):
    import vllm  # the fake

    return vllm.LLM(model="m", enable_sleep_mode=sleep_mode)


# --- the vLLM shims -----------------------------------------------------------------------------------

def test_the_shims_reach_vllms_worker_model_and_loader(fake_vllm):
    llm = fake_llm()
    worker = llm.llm_engine.model_executor.driver_worker.worker
    assert vllm_worker(llm) is worker
    assert vllm_model(llm) is worker.model_runner.model is llm.model
    assert vllm_packed_modules(llm) == VLLM_FUSED
    load_vllm_weights(llm, iter([("model.norm.weight", torch.ones(2)), ("lm_head.weight", torch.zeros(3))]))
    assert [list(call) for call in llm.model.loaded] == [["model.norm.weight", "lm_head.weight"]]
    assert torch.equal(llm.model.loaded[0]["model.norm.weight"], torch.ones(2))


def test_a_model_without_fused_layers_packs_nothing(fake_vllm):
    llm = fake_llm()
    llm.llm_engine.model_executor.driver_worker.worker.model_runner.model = torch.nn.Linear(2, 2)
    assert vllm_packed_modules(llm) == {}


def test_the_kv_cache_alone_is_released_after_the_gpu_is_done_and_mapped_back(fake_vllm):
    llm, allocator = fake_llm(), fake_vllm.allocator
    assert release_vllm_kv_cache() == 2
    assert allocator.events == [("cuda.synchronize",), ("unmap", "kv_cache"), ("unmap", "kv_cache")]
    assert allocator.released() == {"kv_cache"}  # the weights stay mapped
    assert release_vllm_kv_cache() == 0  # released already: nothing is unmapped twice
    assert allocator.events[3:] == [("cuda.synchronize",)]
    wake_vllm_kv_cache(llm)
    assert llm.calls == [("worker.wake_up", ["kv_cache"])]
    assert allocator.events[4:] == [("map", "kv_cache"), ("map", "kv_cache")] and allocator.released() == set()


def test_the_bytes_vllm_released_are_counted_until_they_are_mapped_again(fake_vllm, tiny_model):
    """torch's statistics go on counting released sleep-mode memory as allocated: StepMeter takes
    out what vllm_released_bytes says (the allocations' sizes, from their handles)."""
    policy, cfg = policy_for(tiny_model, "full")
    engine = engine_for(tiny_model, policy, cfg)
    assert vllm_released_bytes() == 0 and engine.released_bytes() == 0 and engine.wakes == 0
    engine.sync_weights(policy, step=0)
    engine.sleep()  # full fine-tuning: weights and KV cache, 2 allocations each
    assert engine.released_bytes() == vllm_released_bytes() == 4 * FakeCuMemAllocator.SIZE
    engine.sync_weights(policy, step=1)  # the weights come back; the KV cache waits for generate
    assert engine.released_bytes() == 2 * FakeCuMemAllocator.SIZE and engine.wakes == 1
    engine.generate(PROMPTS, PARAMS)
    assert engine.released_bytes() == 0 and engine.wakes == 2


def _worker(llm):
    return llm.llm_engine.model_executor.driver_worker.worker


def _strip_is_asleep(llm):
    for address, data in list(llm.allocator.pointer_to_data.items()):
        llm.allocator.pointer_to_data[address] = types.SimpleNamespace(handle=data.handle, tag=data.tag)


MISSING = {  # what is taken away, the shim called, what the error must say
    "worker": (lambda llm: delattr(llm.llm_engine.model_executor, "driver_worker"), vllm_worker,
               r"vllm_worker: vLLM 0\.26\.0 has no `driver_worker` on `llm\.llm_engine\.model_executor` \(the path "
               r"`llm\.llm_engine\.model_executor\.driver_worker\.worker`, checked with vLLM 0\.26\.x\)\. .*"
               r"VLLM_ENABLE_V1_MULTIPROCESSING unset or 0"),
    "model": (lambda llm: delattr(_worker(llm).model_runner, "model"), vllm_model,
              r"vllm_model: vLLM 0\.26\.0 has no `model` on `llm\.llm_engine\.model_executor\.driver_worker\.worker"
              r"\.model_runner`"),
    "loader": (lambda llm: setattr(_worker(llm).model_runner, "model", torch.nn.Linear(2, 2)),
               lambda llm: load_vllm_weights(llm, []),
               r"load_vllm_weights: vLLM 0\.26\.0 has no `load_weights` on `model`"),
    "worker wake_up": (lambda llm: setattr(llm.llm_engine.model_executor.driver_worker, "worker",
                                           types.SimpleNamespace(model_runner=None)), wake_vllm_kv_cache,
                       r"wake_vllm_kv_cache: vLLM 0\.26\.0 has no `wake_up` on `llm\.llm_engine\.model_executor"
                       r"\.driver_worker\.worker`"),
    "allocation flag": (_strip_is_asleep, lambda llm: release_vllm_kv_cache(),
                        r"release_vllm_kv_cache: vLLM 0\.26\.0 has no `is_asleep` on "
                        r"`CuMemAllocator\.get_instance\(\)\.pointer_to_data\[\.\.\.\]`"),
}


@pytest.mark.parametrize("missing", MISSING)
def test_a_missing_attribute_is_named_with_the_version_and_what_to_do(fake_vllm, missing):
    take_away, shim, message = MISSING[missing]
    llm = fake_llm()
    take_away(llm)
    with pytest.raises(EngineError, match=message) as raised:
        shim(llm)
    assert "Install vLLM 0.26.0 (pip install 'grpoflow[gpu]'), or set rollout.engine: hf" in str(raised.value)
    assert fake_vllm.allocator.events == []  # nothing released on the way to the error


SHIMS = {"vllm_worker": vllm_worker, "vllm_model": vllm_model, "wake_vllm_kv_cache": wake_vllm_kv_cache,
         "load_vllm_weights": lambda llm: load_vllm_weights(llm, []),
         "release_vllm_kv_cache": lambda llm: release_vllm_kv_cache()}


@pytest.mark.parametrize("shim", SHIMS)
def test_an_unchecked_vllm_version_is_refused_before_any_private_attribute(monkeypatch, shim):
    fake = fake_vllm_at(monkeypatch, version="0.27.1")
    llm = fake_llm()
    first = "vllm_worker" if shim in ("vllm_model", "wake_vllm_kv_cache", "load_vllm_weights") else shim
    with pytest.raises(EngineError, match=rf"grpoflow\.private_api\.{first} reaches into vLLM's private state, "
                                          r"checked with vLLM 0\.26\.x; vLLM 0\.27\.1 is installed\. Install vLLM "
                                          r"0\.26\.0 \(pip install 'grpoflow\[gpu\]'\), or set rollout\.engine: hf"):
        SHIMS[shim](llm)
    assert llm.calls == [] and fake.allocator.events == [] and llm.model.loaded == []


# --- the FSDP2 shim -----------------------------------------------------------------------------------

def hooks(unit: torch.nn.Module) -> tuple[list, list]:
    return list(unit._forward_pre_hooks.items()), list(unit._forward_hooks.items())


def test_fsdp_hooks_come_off_the_units_and_back_in_their_order():
    units = [FakeFSDPUnit(), FakeFSDPUnit()]
    others = []
    units[0].register_forward_pre_hook(lambda *_: others.append("pre"))  # not FSDP2's: it stays on
    before = [hooks(u) for u in units]
    x = torch.ones(1, 2)
    with fsdp_forward_hooks_off(units):
        for unit in units:
            unit(x)
        assert [u.fsdp_calls for u in units] == [[], []] and others == ["pre"]
        assert [len(h) for u in units for h in hooks(u)] == [1, 0, 0, 0]
    assert [hooks(u) for u in units] == before  # the same hooks, in the same order (FSDP2's pre-hook first)
    for unit in units:
        unit(x)
    assert [u.fsdp_calls for u in units] == [["pre", "post"], ["pre", "post"]] and others == ["pre", "pre"]


def test_fsdp_hooks_come_back_when_the_block_raises():
    unit = FakeFSDPUnit()
    before = hooks(unit)
    with pytest.raises(ValueError, match="inside"):
        with fsdp_forward_hooks_off([unit]):
            raise ValueError("inside")
    assert hooks(unit) == before


def test_an_unchecked_torch_is_warned_about_once_and_the_hooks_still_come_off(monkeypatch, caplog):
    unit = FakeFSDPUnit()
    before = hooks(unit)
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    for _ in range(2):
        with fsdp_forward_hooks_off([unit]):
            assert hooks(unit) == ([], [])
        assert hooks(unit) == before
    warnings = [r.getMessage() for r in caplog.records if r.name == "grpoflow.private_api"]
    assert warnings == ["grpoflow.private_api.fsdp_forward_hooks_off reaches into torch's private state, checked "
                        "with torch 2.11.x / 2.13.x; torch 2.12.0 is installed. Going on: a missing attribute will "
                        "be named if there is one."]


@pytest.mark.parametrize("missing", ["_get_fsdp_state", "_post_forward_hook_handle", "hooks_dict_ref"])
def test_fsdp_state_not_where_it_was_is_named_and_leaves_every_hook_on(missing):
    good, bad = FakeFSDPUnit(), FakeFSDPUnit()
    before = [hooks(good), hooks(bad)]
    version = torch.__version__
    if missing == "_get_fsdp_state":
        bad = torch.nn.Linear(2, 2)
        expected = r"has no `_get_fsdp_state` on `Linear`"
    elif missing == "_post_forward_hook_handle":
        del bad._state._post_forward_hook_handle
        expected = r"has no `_post_forward_hook_handle` on `FSDPState`"
    else:  # a handle of another kind (FSDP2 over several modules at once registers a group's)
        bad._state._pre_forward_hook_handle = types.SimpleNamespace(id=0)
        expected = r"has no `hooks_dict_ref` on `FSDPState\._pre_forward_hook_handle`"
    with pytest.raises(EngineError, match=rf"fsdp_forward_hooks_off: torch {re.escape(version)} {expected} \(the "
                                          r"path `.*`, checked with torch 2\.11\.x / 2\.13\.x\)\. Install torch"):
        with fsdp_forward_hooks_off([good, bad]):
            pass
    assert hooks(good) == before[0]  # the unit before the bad one kept its hooks too
    good(torch.ones(1, 2))
    assert good.fsdp_calls == ["pre", "post"]


def test_the_allocators_settings_reach_torch_and_a_torch_without_the_call_is_named(monkeypatch):
    """grpo.expandable_segments (grpoflow/train/memory.py) sets the allocator through this shim. The
    real call needs a CUDA build of torch to mean anything, so torch's function is stood in for."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    cuda_allocator_settings("expandable_segments:True")
    assert calls == ["expandable_segments:True"]
    monkeypatch.delattr(torch.cuda.memory, "_set_allocator_settings")
    with pytest.raises(EngineError, match=r"cuda_allocator_settings: torch .* has no `_set_allocator_settings` on "
                                          r"`torch\.cuda\.memory`.*or set grpo\.expandable_segments: false"):
        cuda_allocator_settings("expandable_segments:True")


# --- VLLMEngine's standby, through the fakes ----------------------------------------------------------

def policy_for(tiny_model, finetune: str):
    from grpoflow.config import validate_config
    from grpoflow.train.policy import load_policy

    cfg = validate_config({"model": {"finetune": finetune, "dtype": "bfloat16"},
                           "grpo": {"gradient_checkpointing": False}})
    return load_policy(cfg.model, cfg.grpo, str(tiny_model)), cfg


def engine_for(tiny_model, policy, cfg, *, sleep: bool = True):
    from grpoflow.rollout.vllm import VLLMEngine

    lora_rank = cfg.model.lora.r if cfg.model.finetune == "lora" else None
    return VLLMEngine(str(tiny_model), policy.tokenizer, dtype="bfloat16", gpu_memory_utilization=0.3,
                      max_model_len=256, seed=0, lora_rank=lora_rank, sleep=sleep)


def test_full_fine_tuning_sleeps_at_level_2_and_samples_only_after_a_sync(fake_vllm, tiny_model):
    policy, cfg = policy_for(tiny_model, "full")
    engine = engine_for(tiny_model, policy, cfg)
    llm, allocator = engine.llm, fake_vllm.allocator
    names = [name for name, _ in policy.model.named_parameters()]
    assert llm.kwargs["enable_sleep_mode"] is True and "enable_lora" not in llm.kwargs

    engine.sync_weights(policy, step=0)  # awake: nothing to wake, the weights loaded in place
    # the KV cache is allocated: its prompt blocks of the old weights are dropped
    assert llm.calls == [("reset_prefix_cache",)] and [list(loaded) for loaded in llm.model.loaded] == [names]
    groups = engine.generate(PROMPTS, PARAMS)
    assert llm.calls == [("reset_prefix_cache",), ("generate", 2, None)]
    assert [[(c.token_ids, c.logprobs) for c in g] for g in groups] == [[(GENERATED, [-0.5] * 3)] * 2] * 2

    down = policy.model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():  # an optimizer step
        down.mul_(-1.0)
    engine.sleep()
    assert llm.calls[2:] == [("sleep", 2)]  # weights and KV cache released; the next sync rewrites the weights
    assert allocator.released() == {"weights", "kv_cache"} and engine.awake == set() and not engine.weights_current
    engine.sleep()  # asleep already: vLLM is not asked twice
    assert llm.calls[2:] == [("sleep", 2)]
    with pytest.raises(EngineError, match="call sync_weights before generate"):
        engine.generate(PROMPTS, PARAMS)
    assert llm.calls[2:] == [("sleep", 2)]  # refused before waking anything

    engine.sync_weights(policy, step=1)
    assert llm.calls[3:] == [("wake_up", ["weights"])]  # the KV cache stays released until generate
    assert allocator.released() == {"kv_cache"} and engine.awake == {"weights"} and engine.weights_current
    assert list(llm.model.loaded[-1]) == names
    assert torch.equal(llm.model.loaded[-1]["model.layers.0.mlp.down_proj.weight"], down)  # the new weights

    engine.generate(PROMPTS, PARAMS)
    assert llm.calls[4:] == [("wake_up", ["kv_cache"]), ("generate", 2, None)]
    assert allocator.released() == set() and engine.awake == {"weights", "kv_cache"}
    engine.generate(PROMPTS, PARAMS)  # awake: no second wake
    assert llm.calls[6:] == [("generate", 2, None)]


def test_lora_sleeps_at_level_1_and_hands_adapters_over_without_touching_vllms_weights(fake_vllm, tiny_model):
    policy, cfg = policy_for(tiny_model, "lora")
    engine = engine_for(tiny_model, policy, cfg)
    llm, allocator = engine.llm, fake_vllm.allocator
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) == (True, 16, 1)

    engine.sync_weights(policy, step=0)
    first = engine.lora_request
    assert llm.calls == [] and llm.model.loaded == []  # adapters travel as files
    assert (first.lora_int_id, Path(first.lora_path).name) == (1, "v00000001")
    assert (Path(first.lora_path) / "adapter_config.json").is_file()

    engine.sleep()
    assert llm.calls == [("sleep", 1)]  # the base weights parked in host memory, not discarded
    assert allocator.released() == {"weights", "kv_cache"} and engine.awake == set() and engine.weights_current
    engine.sleep()
    assert llm.calls == [("sleep", 1)]
    engine.generate(PROMPTS, PARAMS)  # no sync needed: the weights come back from host memory
    assert llm.calls[1:] == [("wake_up", ["kv_cache", "weights"]), ("generate", 2, first)]

    engine.sleep()
    for step in (1, 2):
        engine.sync_weights(policy, step=step)  # asleep: handing adapters over wakes nothing
    assert llm.calls[3:] == [("sleep", 1)] and allocator.released() == {"weights", "kv_cache"}
    assert engine.lora_request.lora_int_id == 3  # a new id each time: vLLM caches adapters by id
    assert sorted(p.name for p in Path(first.lora_path).parent.iterdir()) == ["v00000002", "v00000003"]
    engine.generate(PROMPTS, PARAMS)
    assert llm.calls[4:] == [("wake_up", ["kv_cache", "weights"]), ("generate", 2, engine.lora_request)]


class Params4bit(torch.nn.Parameter):
    """bitsandbytes' 4-bit parameter as share_weights sees it: packed nf4 bytes (uint8, two weights a
    byte, one column) and its quantization state."""


def quant_state(shape, scale: float, dtype=torch.bfloat16) -> types.SimpleNamespace:
    """A bitsandbytes QuantState as share_weights reads it; `scale` stands for its blocks' scales."""
    return types.SimpleNamespace(shape=torch.Size(shape), blocksize=64, quant_type="nf4", dtype=dtype, scale=scale)


def stand_in_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit, as far as the check needs it: the bytes' values times the scale."""
    return (packed.reshape(-1).float() * state.scale).to(state.dtype)


def test_qlora_takes_vllms_4_bit_bytes_and_quantization_state_for_its_own_weights(monkeypatch, tiny_model, caplog):
    """QLoRA: each 4-bit weight becomes rows of vLLM's packed tensor and computes with vLLM's state of
    that shard (its scales, the policy's output dtype), so trainer and sampler run one 4-bit model.
    Codes that differ near a boundary (vLLM quantized a float32 checkpoint, the trainer its bf16 cast)
    still make the same weight; a shard holding another weight stays apart, and the log says why."""
    import grpoflow.rollout.vllm as vllm_engine
    from grpoflow.rollout.vllm import _hf_name

    monkeypatch.setattr(vllm_engine, "_dequantize_4bit", stand_in_dequantize)
    policy, cfg = policy_for(tiny_model, "lora")
    generator = torch.Generator().manual_seed(0)
    packed, shapes = {}, {}  # each frozen linear weight as a QLoRA trainer holds it: nf4 bytes, rows = numel / 2
    for module in policy.model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            name = _hf_name(f"{module_name(policy.model, module)}.base_layer.weight")
            shapes[name] = tuple(base.weight.shape)
            data = torch.randint(0, 256, (base.weight.numel() // 2, 1), dtype=torch.uint8, generator=generator)
            base.weight = Params4bit(data, requires_grad=False)
            base.weight.quant_state = quant_state(shapes[name], scale=1.0)
            packed[name] = data
    frozen_float = {_hf_name(n): p for n, p in policy.model.named_parameters()
                    if not p.requires_grad and p.is_floating_point()}
    vllm_bytes = dict(packed)
    down, other = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"
    near = packed[down].clone()
    near[::100] += 1  # a code in a hundred one step away: the same weight, quantized from other input
    vllm_bytes[down] = near
    vllm_bytes[other] = torch.randint(0, 256, packed[other].shape, dtype=torch.uint8, generator=generator)
    model = FakeVLLMModel(vllm_layout({**vllm_bytes, **frozen_float}))
    # vLLM's loader: each stacked 4-bit tensor carries its shards' states and where each starts
    part_of = {part: (fused, i) for fused, parts in VLLM_FUSED.items() for i, part in enumerate(parts)}
    for name, tensor in vllm_bytes.items():
        module, _, leaf = name.rpartition(".")
        prefix, _, layer = module.rpartition(".")
        fused, index = part_of.get(layer, (layer, 0))
        vp = dict(model.named_parameters())[f"{prefix}.{fused}.base_layer.{leaf}"]
        if not hasattr(vp, "bnb_quant_state"):
            vp.bnb_quant_state, vp.bnb_shard_offsets = {}, [0]
        vp.bnb_quant_state[index] = quant_state(shapes[name], scale=1.001, dtype=torch.float32)  # its own scales
        vp.bnb_shard_offsets.append(vp.bnb_shard_offsets[-1] + tensor.shape[0])
    blocks = "model.layers.1.self_attn.o_proj.weight"  # the same bytes, quantized in blocks of 128 by vLLM
    o_proj = dict(model.named_parameters())["model.layers.1.self_attn.o_proj.base_layer.weight"]
    o_proj.bnb_quant_state[0].blocksize = 128
    fake_vllm_at(monkeypatch, model=model)
    engine = engine_for(tiny_model, policy, cfg)

    with caplog.at_level("INFO", logger="grpoflow.rollout"):
        saved = engine.share_weights(policy)
    attention = policy.model.base_model.model.model.layers[0].self_attn
    qkv = dict(model.named_parameters())["model.layers.0.self_attn.qkv_proj.base_layer.weight"]
    q, v = attention.q_proj.base_layer.weight, attention.v_proj.base_layer.weight
    k_rows = attention.k_proj.base_layer.weight.shape[0]
    assert q.data_ptr() == qkv.data_ptr() and v.data_ptr() == qkv[q.shape[0] + k_rows:].data_ptr()
    assert type(q) is Params4bit  # the parameter object stays, with vLLM's state of the shard it now is
    assert q.quant_state.scale == 1.001 and q.quant_state.dtype == torch.bfloat16
    assert v.quant_state is not qkv.bnb_quant_state[2] and v.quant_state.shape == qkv.bnb_quant_state[2].shape
    layers = policy.model.base_model.model.model.layers
    assert any(layers[0].mlp.down_proj.base_layer.weight.data_ptr() == t.data_ptr() for t in model.parameters())
    up = layers[1].mlp.up_proj.base_layer.weight
    assert all(up.data_ptr() != t.data_ptr() for t in model.parameters()) and up.quant_state.scale == 1.0
    assert saved == (sum(t.numel() for t in packed.values()) - up.numel() - packed[blocks].numel()
                     + sum(p.numel() * p.element_size() for p in frozen_float.values()))
    assert ("1 frozen tensors (0.00 GiB) stay the policy's own: vLLM's shard there is another weight (values 5% "
            "or more apart)") in caplog.text
    assert ("1 frozen tensors (0.00 GiB) stay the policy's own: vLLM quantized it with another block size (128, "
            "the policy 64)") in caplog.text


def test_a_tensor_left_unshared_is_logged_with_what_each_side_holds():
    """share_weights logs why a frozen tensor stays the policy's own; the reason names both sides' layout,
    so a user (or a failed GPU test) sees at once whether names, dtypes or shapes did not meet."""
    from grpoflow.rollout.vllm import _unlike

    vllm_tensor, packed = torch.zeros(6, 1, dtype=torch.uint8), torch.zeros(3, 1, dtype=torch.uint8)
    assert _unlike(None, 0, packed) == "no tensor of vLLM's model holds it"
    assert _unlike(vllm_tensor, 0, torch.zeros(3, 4, dtype=torch.bfloat16)) == (
        "vLLM holds it as torch.uint8 rows of [1], the policy as torch.bfloat16 rows of [4]")
    assert _unlike(vllm_tensor, 4, packed) == "its rows would end past vLLM's tensor (4 + 3 > 6)"
    assert _unlike(vllm_tensor, 3, packed) is None


def test_qlora_sharing_with_bitsandbytes_itself(monkeypatch, tiny_model):
    """The same with bitsandbytes' own Params4bit, QuantState and kernels (installed on the GPU machine;
    skipped where it is not): vLLM's side quantized as its loader does, from the float32 checkpoint, its
    double-quantized scales made float32; the trainer's from its bf16 cast. After sharing, every 4-bit
    weight of the policy dequantizes to vLLM's, bit for bit, and the policy still runs."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise, quantize_4bit
    from safetensors.torch import load_file

    from grpoflow.rollout.vllm import _hf_name

    policy, cfg = policy_for(tiny_model, "lora")
    checkpoint = load_file(tiny_model / "model.safetensors")  # float32
    vllm_weights, states = {}, {}
    for module in list(policy.model.modules()):
        base = getattr(module, "base_layer", None)
        if not isinstance(base, torch.nn.Linear):
            continue
        name = _hf_name(f"{module_name(policy.model, module)}.base_layer.weight")
        packed, state = quantize_4bit(checkpoint[name], compress_statistics=True, quant_type="nf4")
        state.absmax, state.nested = dequantize_blockwise(state.absmax, state.state2) + state.offset, False
        vllm_weights[name], states[name] = packed, state
        four_bit = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=False, compute_dtype=torch.bfloat16,
                                     quant_type="nf4")
        four_bit.weight = bnb.nn.Params4bit(base.weight.data, requires_grad=False, compress_statistics=True,
                                            quant_type="nf4").to("cpu")  # quantized here, from bf16
        module.base_layer = four_bit
    frozen_float = {_hf_name(n): p for n, p in policy.model.named_parameters()
                    if not p.requires_grad and p.is_floating_point()}
    model = FakeVLLMModel(vllm_layout({**vllm_weights, **frozen_float}))
    part_of = {part: (fused, i) for fused, parts in VLLM_FUSED.items() for i, part in enumerate(parts)}
    params = dict(model.named_parameters())
    for name, packed in vllm_weights.items():
        module, _, leaf = name.rpartition(".")
        prefix, _, layer = module.rpartition(".")
        fused, index = part_of.get(layer, (layer, 0))
        vp = params[f"{prefix}.{fused}.base_layer.{leaf}"]
        if not hasattr(vp, "bnb_quant_state"):
            vp.bnb_quant_state, vp.bnb_shard_offsets = {}, torch.tensor([0])
        vp.bnb_quant_state[index] = states[name]
        vp.bnb_shard_offsets = torch.cat([vp.bnb_shard_offsets, vp.bnb_shard_offsets[-1:] + packed.shape[0]])
    fake_vllm_at(monkeypatch, model=model)
    engine = engine_for(tiny_model, policy, cfg)

    four_bit = {_hf_name(n): p for n, p in policy.model.named_parameters() if type(p).__name__ == "Params4bit"}
    differing = sum(int(not torch.equal(p.data, vllm_weights[n])) for n, p in four_bit.items())
    saved = engine.share_weights(policy)
    assert differing > 0  # quantized from float32 and from bf16, the bytes differ somewhere
    assert saved >= sum(p.numel() for p in four_bit.values())
    storage = [(t.data_ptr(), t.data_ptr() + t.numel()) for t in model.parameters()]
    for name, p in four_bit.items():
        assert any(low <= p.data_ptr() < high for low, high in storage), name
        assert p.quant_state.dtype == torch.bfloat16  # vLLM's scales, the policy's compute dtype
        assert torch.equal(dequantize_4bit(p.data, p.quant_state),
                           dequantize_4bit(vllm_weights[name], states[name]).to(torch.bfloat16)), name
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(policy.model(input_ids=ids).logits).all()


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def test_a_base_held_mostly_twice_is_a_warning_naming_why(monkeypatch, tiny_model, caplog):
    """Where most of the frozen bytes stay the policy's own, share_weights warns: the memory a user counted
    on is not saved (the QLoRA bug of 2026-12-06 sat at INFO). A few tensors apart stay at INFO."""
    from grpoflow.rollout.vllm import _hf_name

    policy, cfg = policy_for(tiny_model, "lora")
    frozen = {_hf_name(name): p for name, p in policy.model.named_parameters() if not p.requires_grad}
    # vLLM's embeddings (most of the tiny model's frozen bytes) hold other values
    differing = {name: t + 1 if "embed_tokens" in name else t for name, t in frozen.items()}
    fake_vllm_at(monkeypatch, model=FakeVLLMModel(vllm_layout(differing)))
    engine = engine_for(tiny_model, policy, cfg)
    with caplog.at_level("INFO", logger="grpoflow.rollout"):
        saved = engine.share_weights(policy)
    kept = [r for r in caplog.records if "stay the policy's own" in r.getMessage()]
    assert 0 < saved == sum(t.numel() * t.element_size() for name, t in frozen.items() if "embed_tokens" not in name)
    assert [(r.levelname, r.getMessage().split(": ", 1)[-1]) for r in kept] == [
        ("WARNING", "1 frozen tensors (0.00 GiB) stay the policy's own: values differ from vLLM's "
                    "(first: model.embed_tokens.weight)")]


def test_shared_base_weights_release_the_kv_cache_alone(monkeypatch, tiny_model):
    from grpoflow.rollout.vllm import _hf_name

    policy, cfg = policy_for(tiny_model, "lora")
    frozen = {name: p for name, p in policy.model.named_parameters() if not p.requires_grad}
    model = FakeVLLMModel(vllm_layout({_hf_name(name): p for name, p in frozen.items()}))
    fake = fake_vllm_at(monkeypatch, model=model)
    engine = engine_for(tiny_model, policy, cfg)
    llm, allocator = engine.llm, fake.allocator

    saved = engine.share_weights(policy)
    assert saved == engine.shared_bytes == sum(p.numel() * p.element_size() for p in frozen.values())
    attention = policy.model.base_model.model.model.layers[0].self_attn
    qkv = dict(model.named_parameters())["model.layers.0.self_attn.qkv_proj.base_layer.weight"]
    q, k = attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight
    assert q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv[q.shape[0]:].data_ptr()  # rows of vLLM's tensor

    engine.sleep()  # vLLM's own sleep would unmap the weights the policy trains on
    assert llm.calls == [("reset_prefix_cache",)]
    assert allocator.events == [("cuda.synchronize",), ("unmap", "kv_cache"), ("unmap", "kv_cache")]
    assert allocator.released() == {"kv_cache"} and engine.awake == {"weights"} and engine.weights_current
    engine.sleep()  # the KV cache is released already
    assert llm.calls == [("reset_prefix_cache",)] and len(allocator.events) == 3

    engine.sync_weights(policy, step=1)
    engine.generate(PROMPTS, PARAMS)
    assert llm.calls[1:] == [("worker.wake_up", ["kv_cache"]), ("generate", 2, engine.lora_request)]
    assert allocator.events[3:] == [("map", "kv_cache"), ("map", "kv_cache")] and allocator.released() == set()


def test_a_generation_from_another_thread_keeps_vllms_kernels_on_its_own_stream(fake_vllm, tiny_model,
                                                                                 monkeypatch):
    """Async rollouts: vLLM 0.26's model runner caches the first caller's stream as its own
    (`main_stream`), waits for it before copying each step's sampled tokens, and puts the calling
    thread back on it. use_stream pins it to the generation's stream, and every generate call runs
    on that stream after what the caller's stream queued (the weights just handed over), whichever
    thread calls; the caller's stream is its own again afterwards."""
    import contextlib
    import threading

    from grpoflow.private_api import vllm_worker

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(("wait", self.name, other))

    current = {}  # thread -> its current stream, as torch keeps it

    @contextlib.contextmanager
    def on(stream):
        before = current.get(threading.get_ident(), "the trainer's stream")
        current[threading.get_ident()] = stream.name
        events.append(("on", stream.name))
        try:
            yield
        finally:
            current[threading.get_ident()] = before

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current.get(threading.get_ident(),
                                                                              "the trainer's stream"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    policy, cfg = policy_for(tiny_model, "full")
    engine = engine_for(tiny_model, policy, cfg)
    generate = engine.llm.generate
    engine.llm.generate = lambda *a, **k: events.append(("generate", torch.cuda.current_stream())) or generate(*a, **k)
    runner = vllm_worker(engine.llm).model_runner

    engine.generate(PROMPTS, PARAMS)  # before use_stream: the caller's stream, untouched
    assert events == [("generate", "the trainer's stream")]
    ahead = Stream("the generation's stream")
    engine.use_stream(ahead)
    assert runner.main_stream is ahead  # vLLM's copies wait for the stream that sampled
    events.clear()
    engine.sync_weights(policy, step=1)
    engine.generate(PROMPTS, PARAMS)  # from the trainer's thread: the first generation of an async run
    assert events == [("wait", "the generation's stream", "the trainer's stream"), ("on", "the generation's stream"),
                      ("generate", "the generation's stream")]
    assert torch.cuda.current_stream() == "the trainer's stream"  # the trainer's thread back on its own
    events.clear()
    thread = threading.Thread(target=engine.generate, args=(PROMPTS, PARAMS))
    thread.start()
    thread.join()
    assert events[-1] == ("generate", "the generation's stream")


def test_a_model_runner_without_a_main_stream_is_left_as_it_is(fake_vllm, tiny_model, monkeypatch):
    """vLLM's older model runner reads the current stream at each step: nothing to pin."""
    from grpoflow.private_api import pin_vllm_main_stream, vllm_worker

    policy, cfg = policy_for(tiny_model, "full")
    engine = engine_for(tiny_model, policy, cfg)
    worker = vllm_worker(engine.llm)
    worker.model_runner = types.SimpleNamespace(model=worker.model_runner.model)
    assert pin_vllm_main_stream(engine.llm, "a stream") is False and not hasattr(worker.model_runner, "main_stream")


def test_without_sleep_mode_vllm_is_never_put_to_sleep(fake_vllm, tiny_model):
    policy, cfg = policy_for(tiny_model, "full")
    engine = engine_for(tiny_model, policy, cfg, sleep=False)
    llm = engine.llm
    assert llm.kwargs["enable_sleep_mode"] is False
    engine.sleep()  # the fake raises if vLLM's sleep is called without sleep mode
    engine.sync_weights(policy, step=1)
    engine.generate(PROMPTS, PARAMS)
    # the KV cache never sleeps: a weight load drops the prompt blocks of the old weights
    assert llm.calls == [("reset_prefix_cache",), ("generate", 2, None)] and len(llm.model.loaded) == 1
    assert engine.awake == {"weights", "kv_cache"} and engine.weights_current
