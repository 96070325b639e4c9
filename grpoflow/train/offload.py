"""Gradient checkpointing whose saved layer inputs wait in host memory (grpo.offload_activations).

Plain gradient checkpointing keeps one tensor per decoder layer through the backward: the layer's
input, [B, T, H]. At long completions that is most of the training memory: 32 layers x 8
completions x 20,000 tokens x 4,096 x 2 bytes is 42 GB. Here each layer input is copied to
pinned host memory as the forward passes it, and copied back for the layer's backward:

    forward, layer k:   run the layer without autograd; copy its input to the host (a side stream,
                        overlapping the next layers' compute); the device copy is then freed
    backward, layer k:  wait for layer k's input (already on its way back), start bringing layer
                        k-1's, recompute layer k with autograd and backpropagate through it

So the device holds one or two layer inputs at a time instead of one per layer. The copies cost
host memory (pinned, reused from step to step) and PCIe bandwidth: a layer input crosses the bus
twice a step, while the layer's recompute and backward run.

    offloader = ActivationOffload()
    enable_offload(model, offloader)   # after gradient checkpointing is on: every decoder layer

It is the reentrant form of checkpointing: the layer's recompute runs inside the backward and
its weights' gradients accumulate there. The RNG and autocast state of the forward are put back
for the recompute, so dropout and mixed precision give what the forward gave. On a CPU the
"host copy" is a copy in the same memory: the same code runs, and the tests compare gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import detach_variable


@dataclass
class _Slot:
    host: torch.Tensor  # the layer input's copy in host memory
    device: torch.device
    event: torch.cuda.Event | None = None  # its copy to the host, or back, is done
    back: torch.Tensor | None = None  # on the device again, once fetched


class ActivationOffload:
    """The layer inputs of one forward, in order; the backward takes them back in reverse."""

    def __init__(self):
        self.slots: list[_Slot] = []
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # pinned buffers by (shape, dtype), reused
        self._stream: torch.cuda.Stream | None = None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        free = self._pool.get((tuple(like.shape), like.dtype))
        if free:
            return free.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)

    def push(self, tensor: torch.Tensor) -> int:
        """Start copying `tensor` to the host; its index, for pop."""
        host = self._buffer(tensor)
        slot = _Slot(host, tensor.device)
        if tensor.is_cuda:
            side = self._side(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the layer input is written
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
                slot.event = torch.cuda.Event()
                slot.event.record(side)
            tensor.record_stream(side)  # the allocator keeps its memory until the copy is done
        else:
            host.copy_(tensor)
        self.slots.append(slot)
        return len(self.slots) - 1

    def _fetch(self, index: int) -> None:
        slot = self.slots[index]
        if slot.back is not None or slot.device.type != "cuda":
            return
        side = self._side(slot.device)
        with torch.cuda.stream(side):
            side.wait_event(slot.event)  # its trip to the host ended
            slot.back = slot.host.to(slot.device, non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(side)

    def pop(self, index: int) -> torch.Tensor:
        """Layer `index`'s input on its device again; starts bringing back the one before it."""
        slot = self.slots[index]
        if slot.device.type != "cuda":
            back = slot.host.clone()
        else:
            self._fetch(index)
            current = torch.cuda.current_stream(slot.device)
            current.wait_event(slot.event)
            back = slot.back
            back.record_stream(current)
            if index > 0:
                self._fetch(index - 1)  # overlaps this layer's recompute and backward
        self._pool.setdefault((tuple(slot.host.shape), slot.host.dtype), []).append(slot.host)
        slot.back = None
        if index == 0:  # the backward reached the first layer: the next forward starts a new list
            self.slots = []
        return back


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader: ActivationOffload, hidden: torch.Tensor, *args):
        ctx.run, ctx.offloader, ctx.args = run, offloader, args
        ctx.device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.slot = offloader.push(hidden)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        hidden = detach_variable((ctx.offloader.pop(ctx.slot),))[0]
        hidden.requires_grad_(True)
        devices = [torch.cuda.current_device()] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, hidden.grad, *(None for _ in ctx.args))


@torch.compiler.disable(recursive=False)
def offloaded_checkpoint(offloader: ActivationOffload, run, hidden: torch.Tensor, *args):
    """transformers' _gradient_checkpointing_func: run(hidden, *args) is one decoder layer. Under
    grpo.torch_compile it runs eagerly (its streams, pinned copies and RNG states are host work dynamo
    does not trace) and the layer it runs is compiled."""
    return _OffloadedLayer.apply(run, offloader, hidden, *args)


def enable_offload(model: torch.nn.Module, offloader: ActivationOffload) -> int:
    """Route every gradient-checkpointed layer of `model` through the offloader; how many."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]
    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, offloader)
    return len(layers)
