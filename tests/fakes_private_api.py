"""CPU fakes of the private vLLM and torch objects that grpoflow/private_api.py reaches into.

vLLM needs a CUDA GPU and is not installed on CPU machines: these stand in for it, object graph for
object graph, so that the shims' lookups, and VLLMEngine's sleep / wake / sync through them, run
here. Each fake has the attribute path its shim follows, and vLLM's behaviour where the engine
depends on it:

    FakeLLM                       vllm.LLM: sleep(level), wake_up(tags), reset_prefix_cache(), generate()
      .llm_engine.model_executor.driver_worker.worker                        FakeWorker: wake_up(tags)
      ...worker.model_runner                                                 FakeModelRunner: main_stream
      ...worker.model_runner.model                                           FakeVLLMModel: load_weights()
    FakeCuMemAllocator            vllm.device_allocator.cumem: get_instance().pointer_to_data, unmap_and_release
    FakeFSDPUnit                  an FSDPModule: _get_fsdp_state()._pre/_post_forward_hook_handle, real hooks

install_fake_vllm(monkeypatch) puts a `vllm` package made of them in sys.modules.

Sleep mode's rules, which the fakes enforce (on a GPU, breaking one is a CUDA error or garbage output):
releasing a released allocation, or mapping a mapped one, raises; generate while any allocation is
released raises, as does load_weights into released weights; a level-2 sleep discards the weights
(garbage until the next load_weights), a level-1 sleep keeps them in host memory; without
enable_sleep_mode there is no sleep.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass

import torch

VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
VLLM_LORA_WRAPPED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # their weight is `<layer>.base_layer.weight`
GENERATED = [11, 12, 13]  # the token ids every fake completion has


class FakeCudaError(RuntimeError):
    """What the GPU would do to a call that breaks sleep mode's rules."""


# --- vllm.device_allocator.cumem ----------------------------------------------------------------------

@dataclass
class FakeAllocation:
    """vllm.device_allocator.AllocationData: the allocation's handle, its tag, whether it is released."""
    handle: tuple
    tag: str
    is_asleep: bool = False


class FakeCuMemAllocator:
    """vLLM's sleep-mode allocator, a process singleton: `get_instance().pointer_to_data` maps an address
    to its FakeAllocation. `events` records each unmap and map, ("unmap", tag) / ("map", tag), and
    whatever a test adds (a CUDA synchronize), in order."""

    instance: FakeCuMemAllocator | None = None

    def __init__(self):
        self.pointer_to_data: dict[int, FakeAllocation] = {}
        self.events: list[tuple[str, ...]] = []

    @staticmethod
    def get_instance() -> FakeCuMemAllocator:
        return FakeCuMemAllocator.instance

    SIZE = 2**20  # bytes an allocation

    def allocate(self, tag: str, count: int) -> None:
        for _ in range(count):
            address = 0x1000 * (len(self.pointer_to_data) + 1)
            # vLLM's handle: (device, size, address, the CUDA memory handle)
            self.pointer_to_data[address] = FakeAllocation(handle=(0, self.SIZE, address, tag), tag=tag)

    def released(self) -> set[str]:
        """The tags with an allocation released now."""
        return {d.tag for d in self.pointer_to_data.values() if d.is_asleep}

    def unmap(self, handle: tuple) -> None:
        data = next(d for d in self.pointer_to_data.values() if d.handle == handle)
        if data.is_asleep:
            raise FakeCudaError(f"unmap of {handle}, released already")
        self.events.append(("unmap", data.tag))  # the caller marks it asleep, as vLLM's sleep does

    def sleep(self) -> None:
        for data in self.pointer_to_data.values():
            unmap_and_release(data.handle)
            data.is_asleep = True

    def wake_up(self, tags: list[str] | None) -> None:
        for data in self.pointer_to_data.values():
            if tags is None or data.tag in tags:
                if not data.is_asleep:
                    raise FakeCudaError(f"map of {data.handle}, mapped already")
                self.events.append(("map", data.tag))
                data.is_asleep = False


def unmap_and_release(handle: tuple) -> None:
    """vllm.device_allocator.cumem.unmap_and_release: the C call that releases an allocation's memory."""
    FakeCuMemAllocator.get_instance().unmap(handle)


# --- vllm.LLM and what is behind it ------------------------------------------------------------------

class FakeBitsAndBytesWeight(torch.nn.Parameter):
    """vLLM 0.26's BitsAndBytesWeightParameter: a 4-bit weight's packed bytes (uint8 storage) whose
    `dtype` answers the model's dtype, torch.get_default_dtype(), not its storage's. Comparing dtypes
    through it kept every 4-bit weight of the trainer its own on the H100 (2026-12-06)."""

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return torch.get_default_dtype()


class FakeVLLMModel(torch.nn.Module):
    """vLLM's model: its parameters under vLLM's names (q/k/v and gate/up fused), a 4-bit weight's
    packed bytes (uint8) as vLLM holds them (FakeBitsAndBytesWeight), `load_weights` recording each
    (name, tensor) it is given."""

    packed_modules_mapping = VLLM_FUSED

    def __init__(self, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        for name, tensor in (weights or {}).items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, torch.nn.Module())
                module = module._modules[part]
            kind = FakeBitsAndBytesWeight if tensor.dtype == torch.uint8 else torch.nn.Parameter
            module.register_parameter(leaf, kind(tensor.detach().clone(), requires_grad=False))
        self.allocator: FakeCuMemAllocator | None = None
        self.garbage = False  # True after a level-2 sleep, until load_weights
        self.loaded: list[dict[str, torch.Tensor]] = []  # one {name: tensor} a load_weights call

    def load_weights(self, weights) -> None:
        if "weights" in self.allocator.released():
            raise FakeCudaError("load_weights into released weights: wake them first")
        self.loaded.append({name: tensor.detach().clone() for name, tensor in weights})
        self.garbage = False


class FakeModelRunner:
    """vLLM 0.26's GPU model runner: `model`, and `main_stream`, a cached_property holding the stream of
    the first caller (here a name: there is no CUDA)."""

    def __init__(self, model: FakeVLLMModel):
        self.model = model

    @functools.cached_property
    def main_stream(self):
        return "the first caller's stream"


class FakeWorker:
    """vLLM's GPU worker: `model_runner.model`, and `wake_up(tags)` that maps the tagged allocations."""

    def __init__(self, llm: FakeLLM, model: FakeVLLMModel):
        self.llm = llm
        self.model_runner = FakeModelRunner(model)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.calls.append(("worker.wake_up", list(tags)))
        self.llm.allocator.wake_up(tags)


class FakeLLM:
    """vllm.LLM as VLLMEngine uses it, in process. `calls` records each call in order; `kwargs` is what
    it was built with."""

    def __init__(self, *, allocator: FakeCuMemAllocator, fake_model: FakeVLLMModel | None = None, **kwargs):
        self.kwargs, self.allocator, self.calls = kwargs, allocator, []  # kwargs["model"]: the model's path
        self.model = fake_model if fake_model is not None else FakeVLLMModel()
        self.model.allocator = allocator
        if kwargs.get("enable_sleep_mode"):  # vLLM allocates through the sleep-mode allocator then
            allocator.allocate("weights", 2)
            allocator.allocate("kv_cache", 2)
        worker = FakeWorker(self, self.model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=worker)))

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))
        if not self.kwargs.get("enable_sleep_mode"):
            raise FakeCudaError("sleep mode is off (enable_sleep_mode=False)")
        self.allocator.sleep()
        self.model.garbage = level == 2  # level 1 keeps the weights in host memory, level 2 discards them

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", list(tags)))
        self.allocator.wake_up(tags)

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, sampling, *, lora_request=None, use_tqdm=True):
        if self.allocator.released():
            raise FakeCudaError(f"generate with {sorted(self.allocator.released())} released")
        if self.model.garbage:
            raise FakeCudaError("generate from weights a level-2 sleep discarded")
        self.calls.append(("generate", len(requests), lora_request))
        done = types.SimpleNamespace(token_ids=GENERATED, finish_reason="stop",
                                     logprobs=types.SimpleNamespace(token_ids=GENERATED, logprobs=[-0.5] * 3))
        return [types.SimpleNamespace(outputs=[done] * s.n) for s in sampling]


@dataclass
class FakeLoRARequest:
    """vllm.lora.request.LoRARequest."""
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class FakeVLLM:
    """What install_fake_vllm installed: the allocator every FakeLLM of the package shares."""
    allocator: FakeCuMemAllocator


def install_fake_vllm(monkeypatch, version: str = "0.26.0", model: FakeVLLMModel | None = None) -> FakeVLLM:
    """A `vllm` package of fakes in sys.modules (vllm, vllm.device_allocator.cumem, vllm.lora.request),
    reporting `version`; its LLM is a FakeLLM around `model` (an empty FakeVLLMModel if None)."""
    fake = FakeVLLM(FakeCuMemAllocator())
    monkeypatch.setattr(FakeCuMemAllocator, "instance", fake.allocator)

    def llm(**kwargs) -> FakeLLM:
        return FakeLLM(allocator=fake.allocator, fake_model=model, **kwargs)

    modules = {name: types.ModuleType(name) for name in
               ("vllm", "vllm.device_allocator", "vllm.device_allocator.cumem", "vllm.lora", "vllm.lora.request")}
    modules["vllm"].__version__ = version
    modules["vllm"].LLM = llm
    modules["vllm"].SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    modules["vllm.device_allocator.cumem"].CuMemAllocator = FakeCuMemAllocator
    modules["vllm.device_allocator.cumem"].unmap_and_release = unmap_and_release
    modules["vllm.lora.request"].LoRARequest = FakeLoRARequest
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
        monkeypatch.setitem(sys.modules, name, module)
    return fake


def vllm_layout(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face weights in vLLM's layout with LoRA on: q/k/v and gate/up stacked into one tensor
    (rows in VLLM_FUSED's order), the LoRA-wrapped layers' weights under `.base_layer`."""
    part_of = {part: (fused, i) for fused, parts in VLLM_FUSED.items() for i, part in enumerate(parts)}
    stacked: dict[str, list] = {}
    for name, tensor in hf_weights.items():
        module, _, leaf = name.rpartition(".")
        prefix, _, layer = module.rpartition(".")
        fused, index = part_of.get(layer, (layer, 0))
        key = f"{prefix}.{fused}" + (".base_layer" if fused in VLLM_LORA_WRAPPED else "") + f".{leaf}"
        stacked.setdefault(key, []).append((index, tensor))
    return {name: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for name, parts in stacked.items()}


# --- torch: an FSDP2 unit ----------------------------------------------------------------------------

class FakeFSDPUnit(torch.nn.Linear):
    """A module as fully_shard leaves it: FSDP2's forward pre-hook and post-hook registered on it (real
    hooks, recording into `fsdp_calls`), their handles on `_get_fsdp_state()` where FSDPState keeps them."""

    def __init__(self):
        super().__init__(2, 2)
        self.fsdp_calls: list[str] = []
        pre = self.register_forward_pre_hook(lambda module, args, kwargs: self.fsdp_calls.append("pre"),
                                             prepend=True, with_kwargs=True)
        post = self.register_forward_hook(lambda module, args, output: self.fsdp_calls.append("post"))
        self._state = types.SimpleNamespace(_pre_forward_hook_handle=pre, _post_forward_hook_handle=post)

    def _get_fsdp_state(self):
        return self._state
