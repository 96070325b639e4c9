"""Data parallelism: the process group torchrun (or accelerate launch) describes, and what crosses ranks.

    dist = setup_distributed()             # reads RANK, WORLD_SIZE, LOCAL_RANK; 1 process without them
    policy.ddp = wrap_ddp(policy, dist)     # grpo.distributed: ddp; the training forward goes through DDP
    policy.fsdp = shard_fsdp(policy.model, dist, policy.dtype)  # grpo.distributed: fsdp; every use goes through it
    dist.all_gather(obj) / dist.all_true(flag) / dist.reduce_metrics(record)

Every process generates its share of each generation's prompts with its own engine and trains on
that share. Under DDP it holds a whole replica of the policy and DDP averages the gradients; under
FSDP2 it holds 1/N of every weight, gradient and optimizer state, and a unit's weights are gathered
for its forward and backward, and all of them at once for a generate call (whole_weights). Rank 0
writes the logs and checkpoints.

NCCL settings are the host's: nothing here sets or changes an NCCL_* variable (shared hosts set
some on purpose, e.g. NCCL_NVLS_ENABLE=0); the ones set are logged once, as they were found.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist

from grpoflow.errors import ConfigError
from grpoflow.private_api import fsdp_forward_hooks_off

log = logging.getLogger("grpoflow.train")

# How each metric combines over processes; anything else is averaged (micro-batch means, the loss,
# which under dapo is each process's share of one generation-wide sum).
SUM_METRICS = ("train/tokens_per_second",)
MAX_METRICS = ("step_seconds",)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any = None  # the process group the collectives go over; None: the default one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_true(self, flag: bool) -> bool:
        """True on every rank when it is True on every rank: ranks take the same branch."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier(group=self.group)

    def side_channel(self) -> Distributed:
        """The same processes over a gloo group of their own, for collectives from another thread
        (the rollouts sampled ahead) while the trainer's go over the default group. Every process
        must call it, in the same order."""
        if not self.active:
            return self
        return replace(self, group=torch_dist.new_group(backend="gloo"), device=torch.device("cpu"))

    def reduce_metrics(self, record: dict[str, float]) -> dict[str, float]:
        """One record for the whole step: sums, maxima, minima or means over the processes."""
        if not self.active:
            return record
        records = self.all_gather(record)
        out = {}
        for key in dict.fromkeys(k for r in records for k in r):
            values = [r[key] for r in records if key in r and r[key] is not None]
            if not values:
                out[key] = None
            elif key in SUM_METRICS:
                out[key] = sum(values)
            elif key in MAX_METRICS or key.startswith("memory/") or key.endswith("/max"):
                out[key] = max(values)
            elif key.endswith("/min"):
                out[key] = min(values)
            else:
                out[key] = sum(values) / len(values)
        return out

    def close(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (data prep, model conversion: cached, content-keyed), the
        others then find its results instead of writing the same folders at the same time."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def setup_distributed() -> Distributed:
    """The process group from torchrun's / accelerate's environment: nccl on CUDA (one GPU per
    process, cuda:LOCAL_RANK), gloo on CPU. Without WORLD_SIZE > 1: one process, no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size <= 1:
        return Distributed(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} GPU(s): "
                               f"start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        # a long timeout: a rank waits at the next collective while another one generates or saves
        torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60),
                                      **({"device_id": device} if cuda else {}))
        if rank == 0:
            nccl = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
            log.info("data parallel: %d processes (%s)%s", world_size, torch_dist.get_backend(),
                     f"; the host's NCCL settings, unchanged: {nccl}" if nccl else "")
    return Distributed(rank, world_size, local_rank, device)


class CompletionLogps(torch.nn.Module):
    """The training forward as one module, so that DDP sees it: DDP all-reduces gradients only
    for a forward that went through its wrapper, and the chunked log-probs path calls the
    backbone and the lm_head itself, not model.forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_len: int, **kwargs):
        from grpoflow.train.logps import completion_logps

        return completion_logps(self.model, input_ids, attention_mask, completion_len, **kwargs)


def wrap_ddp(model: torch.nn.Module, dist: Distributed) -> torch.nn.Module:
    """DDP over the training forward. Building it broadcasts rank 0's weights to every rank, so
    replicas start equal whatever happened before (a warm-up, a resume)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(CompletionLogps(model), device_ids=[dist.device] if dist.device.type == "cuda"
                                   else None)


class FSDPRoot(torch.nn.Module):
    """FSDP2's root module around the policy: `root(fn, *args)` runs fn(model, *args) as its forward.

    Every use of a sharded model goes through here (the training forward, log-probs without
    gradient, generate, the warm-up): FSDP2 gathers a unit's weights in hooks around a module's
    forward, and the chunked and Triton log-probs call the backbone and read lm_head.weight
    themselves, never model.forward. So the weights outside the decoder layers (embeddings, final
    norm, lm_head: one tensor when tied) belong to this module's unit, gathered for the whole call
    and, when a gradient flows, reduce-scattered after the backward. It also makes this module the
    first FSDP module to run, which FSDP2 takes as its root."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def shard_fsdp(model: torch.nn.Module, dist: Distributed, dtype: torch.dtype, what: str = "policy") -> torch.nn.Module:
    """FSDP2 (`fully_shard`) over the policy: each decoder layer a unit, then the rest under an
    FSDPRoot. Each process keeps 1/N of every weight (moved to its device as it is sharded, so the
    whole model is never on one card); gradients are reduce-scattered and averaged, as DDP averages
    them. Mixed precision from the run's dtype: weights gathered and used in it, gradients reduced
    in float32; float32 runs keep float32 throughout. Call it before the optimizer is made: the
    optimizer must hold the shards (DTensor parameters), not the whole tensors they replace."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise ConfigError(f"grpo.distributed: fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch "
                          f"{torch.__version__} does not have: install torch 2.13, or use grpo.distributed: ddp") from None

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    root = fully_shard(FSDPRoot(model), mesh=mesh, mp_policy=mixed)
    if dist.is_main:
        log.info("FSDP2, %s: %d decoder layers and the root (embeddings, norm, lm_head) sharded over %d "
                 "processes%s", what, len(layers), dist.world_size, f", {str(dtype).removeprefix('torch.')} weights "
                 "in use, float32 gradient reduction" if dtype != torch.float32 else "")
    return root


@contextlib.contextmanager
def whole_weights(root: torch.nn.Module) -> Iterator[None]:
    """Every unit of a shard_fsdp model gathered once, whole until the block ends: the root's
    forwards inside the block gather nothing (generate: one all-gather per unit a call, instead of
    one per layer per decoding step). Meanwhile every process holds the whole weights, in the
    dtype they are used in, as one process does. Then every unit is sharded again, the layers
    reshard after their forward again and the root keeps its weights until the backward (FSDP2's
    default for the root), as shard_fsdp left them, even when the block raised."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)  # every unit: a forward leaves the weights gathered
    try:
        for unit in units:
            unit.unshard()
        try:
            # the layers' forward hooks off while their weights stay gathered (the root's stay: it runs once a call)
            with fsdp_forward_hooks_off([unit for unit in units if unit is not root]):
                yield
        except BaseException:
            # a forward cut short leaves FSDP2 mid-iteration, its units still "in their forward": the
            # root's reshard() below would do nothing (it keeps its weights after a forward) and the
            # stale state would carry into the next forward. This is FSDP2's recovery for that
            # (torch 2.13; on a torch without it the error still propagates, the root may stay whole)
            if hasattr(root, "reset_iter_state"):
                root.reset_iter_state()
            raise
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers never splits across devices
    (`_no_split_modules`, e.g. LlamaDecoderLayer), which is also what accelerate's FSDP wraps."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    names = set(getattr(causal_lm, "_no_split_modules", None) or [])
    layers = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"grpo.distributed: fsdp found no decoder layers to shard in {type(causal_lm).__name__} "
                           f"(its _no_split_modules: {sorted(names) or 'none'}); use grpo.distributed: ddp")
    return layers


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for each parameter, under the model's own names. A shard (FSDP2's
    DTensor) is gathered from every process, a collective: every process must go through all of
    them, in this order. A tied weight comes once, as named_parameters gives it."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if isinstance(p, DTensor) else p).detach()
