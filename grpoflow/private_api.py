"""Every reach into vLLM's or torch's private state, fenced in one module of version-checked shims.

grpoflow drives two libraries below their public API: vLLM's in-process worker (the policy's
weights loaded into vLLM's own tensors, the KV cache released and taken back alone) and FSDP2's
forward hooks (taken off decoder layers whose weights are gathered for a generate call). Each reach
is one function here, written against the versions the lock files pin:

    shim                          private state it touches                               checked with
    vllm_worker(llm)              LLM.llm_engine.model_executor.driver_worker.worker     vLLM 0.26
    vllm_model(llm)               ...worker.model_runner.model                           vLLM 0.26
    vllm_packed_modules(llm)      ...model.packed_modules_mapping                        vLLM 0.26
    vllm_4bit_shards(param)       a bitsandbytes weight's bnb_quant_state and             vLLM 0.26
                                  bnb_shard_offsets (vLLM's bitsandbytes loader)
    pin_vllm_main_stream(llm, s)  ...worker.model_runner.main_stream (a cached_property)   vLLM 0.26
    load_vllm_weights(llm, ...)   ...model.load_weights(weights=...)                     vLLM 0.26
    wake_vllm_kv_cache(llm)       ...worker.wake_up(tags=["kv_cache"])                   vLLM 0.26
    release_vllm_kv_cache()       CuMemAllocator.get_instance().pointer_to_data,         vLLM 0.26
                                  unmap_and_release (vllm.device_allocator.cumem)
    fsdp_forward_hooks_off(units) FSDPModule._get_fsdp_state()._pre_forward_hook_handle  torch 2.11, 2.13
                                  and _post_forward_hook_handle
    cuda_allocator_settings(text) torch.cuda.memory._set_allocator_settings              torch 2.11, 2.13

vLLM 0.26.0 and torch 2.11.0 are requirements/gpu.txt's pins (the GPU machine), torch 2.13.0+cpu
requirements/cpu.txt's. The installed version is checked at a shim's first use (then remembered):
another vLLM is an EngineError (vLLM's internals move between minor releases, and import_vllm
refuses it too); another torch, which pyproject allows, gets one warning and the shim goes on,
since FSDP2's state has stayed put across releases. An attribute no longer where it was is an
EngineError naming the attribute, the version and what to do, instead of an AttributeError deep
inside a training step. Callers never
name a private attribute themselves. tests/fakes_private_api.py holds a CPU fake of each object
graph; tests/test_private_api.py drives the shims, and VLLMEngine's sleep / wake / sync, through them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import Any, Iterable, Iterator

from grpoflow.errors import EngineError

VLLM_CHECKED = ("0.26.",)  # version prefixes: vLLM 0.26.0 (requirements/gpu.txt)
TORCH_CHECKED = ("2.11.", "2.13.")  # torch 2.11.0 (requirements/gpu.txt), 2.13.0+cpu (requirements/cpu.txt)

_LIBRARIES = {"vllm": ("vLLM", VLLM_CHECKED), "torch": ("torch", TORCH_CHECKED)}
_STRICT = {"vllm"}  # libraries whose other versions are refused; the others are warned about once
log = logging.getLogger("grpoflow.private_api")
_VLLM_TODO = "Install vLLM 0.26.0 (pip install 'grpoflow[gpu]'), or set rollout.engine: hf"
_IN_PROCESS = ("vLLM's model is reachable only when its engine runs in this process: leave "
               "VLLM_ENABLE_V1_MULTIPROCESSING unset or 0 (grpoflow sets 0 unless the environment sets it). ")
_TORCH_TODO = "Install torch 2.11.0 or 2.13.0 (the versions requirements/*.txt pin), or set grpo.distributed: ddp"
_WORKER = "llm_engine.model_executor.driver_worker.worker"

_checked: set[tuple[str, str]] = set()  # (library, version) already found among the checked ones


class _Shim:
    """One shim's checks: the installed version (once a version, then remembered), and each dotted
    attribute path it follows. Both raise an EngineError that says which shim, which attribute, which
    version and what to do (`todo`; `missing`, said first when an attribute is missing)."""

    def __init__(self, name: str, library: str, todo: str, missing: str = ""):
        self.name, self.library, self.todo, self.missing = name, library, todo, missing
        self.library_name, self.checked = _LIBRARIES[library]

    def version(self) -> str:
        module = sys.modules.get(self.library) or importlib.import_module(self.library)
        version = str(module.__version__)
        if (self.library, version) not in _checked:
            if not version.startswith(self.checked):
                text = (f"grpoflow.private_api.{self.name} reaches into {self.library_name}'s private state, "
                        f"checked with {self._checked_text()}; {self.library_name} {version} is installed.")
                if self.library in _STRICT:
                    raise EngineError(f"{text} {self.todo}")
                log.warning("%s Going on: a missing attribute will be named if there is one.", text)
            _checked.add((self.library, version))
        return version

    def walk(self, obj: Any, start: str, path: str) -> Any:
        """getattr along `path` from `obj` (called `start` in messages), after the version check."""
        version = self.version()
        reached = start
        for attr in path.split("."):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise EngineError(f"grpoflow.private_api.{self.name}: {self.library_name} {version} has no "
                                  f"`{attr}` on `{reached}` (the path `{start}.{path}`, checked with "
                                  f"{self._checked_text()}). {self.missing}{self.todo}") from None
            reached += f".{attr}"
        return obj

    def _checked_text(self) -> str:
        return f"{self.library_name} {' / '.join(v + 'x' for v in self.checked)}"


# --- vLLM: the in-process worker and its model ------------------------------------------------------

_VLLM_WORKER = _Shim("vllm_worker", "vllm", _VLLM_TODO, missing=_IN_PROCESS)
_VLLM_MODEL = _Shim("vllm_model", "vllm", _VLLM_TODO)
_LOAD_WEIGHTS = _Shim("load_vllm_weights", "vllm", _VLLM_TODO)
_VLLM_4BIT = _Shim("vllm_4bit_shards", "vllm", _VLLM_TODO)
_PIN_STREAM = _Shim("pin_vllm_main_stream", "vllm", _VLLM_TODO)
_WAKE_KV_CACHE = _Shim("wake_vllm_kv_cache", "vllm", _VLLM_TODO)
_RELEASE_KV_CACHE = _Shim("release_vllm_kv_cache", "vllm", _VLLM_TODO)


def vllm_worker(llm) -> Any:
    """vLLM's GPU worker behind an in-process `vllm.LLM`: `llm.llm_engine.model_executor.driver_worker.worker`
    (private to vLLM's V1 engine; there only with VLLM_ENABLE_V1_MULTIPROCESSING=0). Checked with vLLM 0.26.0."""
    return _VLLM_WORKER.walk(llm, "llm", _WORKER)


def vllm_model(llm) -> Any:
    """The torch module vLLM samples from: `worker.model_runner.model`, in vLLM's own parameter layout
    (q/k/v and gate/up fused). Checked with vLLM 0.26.0."""
    return _VLLM_MODEL.walk(vllm_worker(llm), f"llm.{_WORKER}", "model_runner.model")


def vllm_packed_modules(llm) -> dict[str, list[str]]:
    """Which Hugging Face layers each of the model's fused layers holds: `model.packed_modules_mapping`,
    e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}, a class attribute of vLLM's model classes. A
    model without fused layers may declare none: {} then, not an error. Checked with vLLM 0.26.0."""
    return dict(getattr(vllm_model(llm), "packed_modules_mapping", None) or {})


def vllm_4bit_shards(param) -> dict[int, Any]:
    """The 4-bit shards of one of vLLM's bitsandbytes weights: {byte offset in its packed tensor:
    bitsandbytes QuantState}. vLLM's loader quantizes each checkpoint weight on its own and stacks
    the packed bytes (q/k/v, gate/up) with their states as `bnb_quant_state` {index: state} and
    `bnb_shard_offsets` (the shards' starts, then the end); its double-quantized scales are already
    float32. {} for a weight that is not 4-bit. Checked with vLLM 0.26.0."""
    if getattr(param, "bnb_quant_state", None) is None:
        return {}
    states = _VLLM_4BIT.walk(param, "param", "bnb_quant_state")
    starts = [int(s) for s in _VLLM_4BIT.walk(param, "param", "bnb_shard_offsets")][:-1]
    return {start: states[index] for index, start in enumerate(starts)}


def pin_vllm_main_stream(llm, stream) -> bool:
    """Make `stream` the one vLLM's model runner counts as its own: `worker.model_runner.main_stream`.
    vLLM 0.26's GPU model runner (vllm/v1/worker/gpu) caches it as a functools.cached_property, the
    stream current in whichever thread first asked, and after every decoding step copies the sampled
    tokens once that stream is done, then makes it the calling thread's current stream. Called from
    another thread than the first, its decoding moved onto that thread's stream after one step. An
    instance attribute of the same name is what the cached_property reads from then on. False for a
    runner without it (vLLM's older runner reads the current stream each step). Checked with vLLM 0.26.0."""
    runner = _PIN_STREAM.walk(vllm_worker(llm), f"llm.{_WORKER}", "model_runner")
    if not hasattr(type(runner), "main_stream"):
        return False
    runner.main_stream = stream
    return True


def load_vllm_weights(llm, weights: Iterable[tuple[str, Any]]) -> None:
    """Copy (Hugging Face name, tensor) pairs into vLLM's own tensors, in place: `model.load_weights(weights=...)`,
    vLLM's checkpoint loader (it maps the names, and stacks q/k/v and gate/up). Checked with vLLM 0.26.0."""
    _LOAD_WEIGHTS.walk(vllm_model(llm), "model", "load_weights")(weights=weights)


def vllm_released_bytes() -> int:
    """Bytes of vLLM's sleep-mode allocations released now (asleep; a handle is (device, size, address,
    memory handle)). torch's allocator statistics still count them as allocated, since vLLM keeps their
    addresses reserved, though the card has the memory back: the trainer's memory metrics take them out
    (StepMeter, grpoflow/train/log.py). Checked with vLLM 0.26.0."""
    from vllm.device_allocator.cumem import CuMemAllocator

    allocator = _RELEASE_KV_CACHE.walk(CuMemAllocator, "CuMemAllocator", "get_instance")()
    allocations = _RELEASE_KV_CACHE.walk(allocator, "CuMemAllocator.get_instance()", "pointer_to_data").values()
    return sum(int(data.handle[1]) for data in allocations if data.is_asleep)


def wake_vllm_kv_cache(llm) -> None:
    """Map back the KV cache that release_vllm_kv_cache released: `worker.wake_up(tags=["kv_cache"])`,
    the worker's side of `LLM.wake_up`. Checked with vLLM 0.26.0."""
    _WAKE_KV_CACHE.walk(vllm_worker(llm), f"llm.{_WORKER}", "wake_up")(tags=["kv_cache"])


def release_vllm_kv_cache() -> int:
    """Unmap the KV cache alone (`LLM.sleep` unmaps every allocation, the weights too). Each allocation of
    vLLM's sleep-mode allocator (`CuMemAllocator.get_instance().pointer_to_data`, vllm.device_allocator.cumem)
    tagged "kv_cache" and awake is released with `unmap_and_release(handle)` and marked `is_asleep`, as
    vLLM's own sleep marks it, so that wake_vllm_kv_cache maps it again. Waits for the GPU first: a
    kernel still reading the cache must finish. The caller resets vLLM's prefix cache before (its cached
    blocks are about to hold garbage). Returns how many allocations were released. Checked with vLLM 0.26.0."""
    import torch

    version = _RELEASE_KV_CACHE.version()
    try:
        from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release
    except ImportError as e:
        raise EngineError(f"grpoflow.private_api.release_vllm_kv_cache: vLLM {version} has no "
                          f"vllm.device_allocator.cumem.CuMemAllocator / unmap_and_release ({e}), checked with "
                          f"{_RELEASE_KV_CACHE._checked_text()}. {_VLLM_TODO}") from None
    allocator = _RELEASE_KV_CACHE.walk(CuMemAllocator, "CuMemAllocator", "get_instance")()
    allocations = list(_RELEASE_KV_CACHE.walk(allocator, "CuMemAllocator.get_instance()", "pointer_to_data").values())
    for data in allocations:  # every attribute found before anything is released
        for attr in ("tag", "is_asleep", "handle"):
            _RELEASE_KV_CACHE.walk(data, "CuMemAllocator.get_instance().pointer_to_data[...]", attr)
    torch.cuda.synchronize()
    released = 0
    for data in allocations:
        if data.tag == "kv_cache" and not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
            released += 1
    return released


# --- torch: FSDP2's forward hooks ---------------------------------------------------------------------

_FSDP_HOOKS = _Shim("fsdp_forward_hooks_off", "torch", _TORCH_TODO)


@contextlib.contextmanager
def fsdp_forward_hooks_off(units: list) -> Iterator[None]:
    """FSDP2's forward hooks taken off these units (decoder layers whose weights are already gathered)
    until the block ends, then put back in their order. Each hook call is Python work, at every layer
    of every decoding step, and decoding a small model is bound by that work: on 2 CPU processes, 30
    layers, a decoding step took 23-29 ms with the hooks and 17 ms without (16 ms for the whole model
    alone). With the weights gathered and kept gathered the hooks have nothing to do: the layers'
    parameters already are the whole tensors, and the inputs come from the root's forward, in the
    dtype in use.

    Private state: `unit._get_fsdp_state()` (FSDPModule) and its `_pre_forward_hook_handle` and
    `_post_forward_hook_handle` (FSDPState, as fully_shard of one module sets them), each a
    RemovableHandle whose `hooks_dict_ref()` is the module's hooks dict and `id` the hook's key in it.
    Checked with torch 2.11.0 and 2.13.0. Every unit's handles are found before any hook comes off:
    a missing attribute leaves every hook on."""
    handles = []
    for unit in units:
        state = _FSDP_HOOKS.walk(unit, type(unit).__name__, "_get_fsdp_state")()
        for name in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            handle = _FSDP_HOOKS.walk(state, "FSDPState", name)
            for attr in ("hooks_dict_ref", "id"):
                _FSDP_HOOKS.walk(handle, f"FSDPState.{name}", attr)
            handles.append(handle)
    saved = []  # (hooks dict, its items before): restored whole, so the order stays
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            saved.append((hooks, list(hooks.items())))
            del hooks[handle.id]
    try:
        yield
    finally:
        for hooks, items in reversed(saved):
            hooks.clear()
            hooks.update(items)


# --- torch: the CUDA caching allocator's settings ----------------------------------------------------

_ALLOCATOR = _Shim("cuda_allocator_settings", "torch", "Install torch 2.11.0 or 2.13.0 (the versions "
                   "requirements/*.txt pin), or set grpo.expandable_segments: false")


def cuda_allocator_settings(settings: str) -> None:
    """torch's CUDA caching allocator reconfigured in a running process, as PYTORCH_CUDA_ALLOC_CONF
    configures it at the start (`settings` in that syntax, e.g. "expandable_segments:True"); it
    applies to the segments mapped from then on. Private state: `torch.cuda.memory._set_allocator_settings`,
    the call vLLM 0.26 makes around its sleep-mode pool too. Checked with torch 2.11.0 and 2.13.0."""
    import torch

    _ALLOCATOR.walk(torch.cuda.memory, "torch.cuda.memory", "_set_allocator_settings")(settings)
