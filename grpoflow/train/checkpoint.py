"""Checkpoints: written atomically (temp folder, then rename), the newest K kept, resumable exactly.

A checkpoint holds everything the next step depends on: trained weights, optimizer, schedule,
loss scaler, every RNG, the data position and the unconsumed rest of the current generation
(each process's, under data parallelism; rank 0 writes the checkpoint).

    step-000010/model/              the trained weights, once: adapters (LoRA) or the whole model
    step-000010/trainer_state.pt    the rest

Under FSDP2 every process holds a shard: `gather_trained` and `gather_optimizer` put whole tensors
on rank 0 (every process calls them), which writes the same layout as one process does. The
optimizer state is then keyed by parameter name rather than position; either kind loads into a
sharded or a whole model, so a checkpoint resumes on any number of processes, with or without FSDP.

    weights, optimizer_state = gather_trained(policy), gather_optimizer(policy, optimizer)  # every process
    save_checkpoint(folder, policy, weights, optimizer_state, scheduler, scaler, state, keep)  # rank 0
    load_trained(path, policy)                                       # before sharding and the optimizer
    state = load_checkpoint(path, policy, optimizer, scheduler, scaler)  # the rest: a TrainState
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpoflow.atomic import TEMP, atomic_folder, temporary_name
from grpoflow.errors import ConfigError
from grpoflow.hashing import cache_key, file_sha256
from grpoflow.train.generation import GenerationBatch

log = logging.getLogger("grpoflow.train")
PREFIX = "step-"
TEMPORARY = TEMP  # a checkpoint being written or removed (grpoflow.atomic's names); never read, removed when found


@dataclass
class TrainState:
    """Where a run is, besides its weights, optimizer, schedule, loss scaler and RNGs: what a
    checkpoint holds for the loop to go on exactly where it stopped."""
    step: int = 0  # optimizer steps done
    next_micro: int = 0  # micro-batches of the current generation trained on so far
    nonfinite_in_row: int = 0  # optimizer steps skipped in a row for a non-finite loss or gradient
    skipped_steps: int = 0
    warmup: dict[str, Any] | None = None  # the format warm-up's report
    sampler: dict[str, Any] | None = None  # PromptSampler.state_dict(): the data position
    # each process's unconsumed rows of the current generation (batch_to_state), and its RNGs
    buffers: list[dict[str, Any] | None] = field(default_factory=lambda: [None])
    rng_by_rank: list[dict[str, Any]] = field(default_factory=list)
    num_processes: int = 1
    at_generation_boundary: bool = True  # the generation was used up: resumable on any number of processes
    rows_reached: set[int] = field(default_factory=set)  # training rows a loss has seen (indices), all processes
    # rollout.mode async: each process's generation sampled ahead, and the step the next one starts at
    rollouts_ahead: list[dict[str, Any] | None] = field(default_factory=lambda: [None])
    # the best checkpoint so far by grpo.metric_for_best_model (transformers' TrainerState names)
    best_metric: float | None = None
    best_global_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict(): it would copy the tensors

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        """From trainer_state.pt's keys, older checkpoints' too (one process's "buffer", no RNG per rank)."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        if "buffers" not in saved:
            state.buffers = [saved.get("buffer")]
        if "at_generation_boundary" not in saved:
            state.at_generation_boundary = all(b is None for b in state.buffers)
        return state

    def buffer_of(self, path: Path, rank: int, world_size: int) -> dict[str, Any] | None:
        """This process's unconsumed rows. On another number of processes they would have to be
        dealt out again: resumable at a generation boundary only."""
        if len(self.buffers) == world_size:
            return self.buffers[rank]
        if self.at_generation_boundary:
            return None  # used up: the next generation is drawn for this number of processes
        raise ConfigError(
            f"{path} stopped inside a generation (micro-step {self.next_micro} of it) on {len(self.buffers)} "
            f"process(es); this run has {world_size}. Resume it on {len(self.buffers)} process(es), or from a "
            f"checkpoint at a generation boundary (grpo.save_steps a multiple of the optimizer steps per generation, "
            f"see `grpoflow explain-batches`), or set grpo.resume_from_checkpoint: false to start over.")


    def rollouts_ahead_of(self, path: Path, rank: int, world_size: int) -> dict[str, Any] | None:
        """This process's generation sampled ahead (rollout.mode async), if the run had one."""
        if len(self.rollouts_ahead) == world_size:
            return self.rollouts_ahead[rank]
        if all(a is None for a in self.rollouts_ahead):
            return None
        raise ConfigError(
            f"{path} holds a generation sampled ahead (rollout.mode: async) by {len(self.rollouts_ahead)} "
            f"process(es); this run has {world_size}. Resume it on {len(self.rollouts_ahead)} process(es), or set "
            f"grpo.resume_from_checkpoint: false to start over.")


def batch_to_state(batch: GenerationBatch | None) -> dict[str, Any] | None:
    """A generation's rows as plain values on the host, for a checkpoint."""
    if batch is None:
        return None
    return {f.name: (v.cpu() if isinstance(v := getattr(batch, f.name), torch.Tensor) else v) for f in fields(batch)}


def batch_from_state(state: dict[str, Any] | None, device) -> GenerationBatch | None:
    if state is None:
        return None
    state = {"importance_sampling_ratio": state.pop("is_weights", None),  # its name until December 2026
             "sampling_logps": None, **state}  # None: checkpoints from before the vLLM engine
    return GenerationBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


EVAL_KEYS = ("eval_strategy", "eval_steps", "eval_prompts", "metric_for_best_model", "greater_is_better",
             "load_best_model_at_end")


# grpo keys added since runs were first keyed (issues #27 and #21), at the values that train as before them
KEYS_ADDED_LATER = {"num_train_epochs": None, "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05,
                    "top_entropy_quantile": 1.0, "dynamic_sampling": False, "dynamic_sampling_max_draws": 4}


def run_key(cfg, train_path: Path, model_path: str, num_processes: int = 1) -> str:
    """Same data, base model and training config: the same run, whose checkpoints it resumes. The
    batch counts as its 1-process equivalent (per_device_train_batch_size x processes), so the same
    global batch on another number of processes is the same run; with ddp or fsdp alike
    (grpo.distributed), whose checkpoints are the same. rollout.mode: async counts, with its staleness,
    and a multi-turn rollout.environment, with its max_turns. Memory and speed settings do not count
    (the offload, forwards by token budget, torch.compile, the allocator's expandable segments): a run
    resumes with them switched.
    Evaluation during training changes no weight (it restores the RNGs it uses): its keys count only
    where final/ becomes the best checkpoint."""
    grpo = cfg.grpo.model_dump(mode="json", exclude={"output_dir", "logging_steps", "log_completions_steps",
                                                    "log_completions", "report_to", "save_steps",
                                                    "save_total_limit", "resume_from_checkpoint", "distributed",
                                                    "offload_activations", "max_tokens_per_forward",
                                                    "torch_compile", "expandable_segments", *EVAL_KEYS})
    for key, default in KEYS_ADDED_LATER.items():  # at their defaults, the runs from before them resume
        if grpo[key] == default:
            del grpo[key]
    if cfg.rollout.mode == "async":  # which weights sample each generation: another run
        grpo["rollout"] = ["async", cfg.rollout.max_staleness]
    if cfg.rollout.ignore_eos:  # completions that run past their end: another run
        grpo["ignore_eos"] = True
    if cfg.rollout.environment != "single_turn":  # what the model's turns are answered with: another run
        grpo["environment"] = [cfg.rollout.environment, cfg.rollout.max_turns]
    grpo["per_device_train_batch_size"] *= num_processes
    if cfg.grpo.load_best_model_at_end:
        grpo["best_model"] = [cfg.grpo.metric_for_best_model, cfg.grpo.greater_is_better]
    return cache_key({"data": file_sha256(Path(train_path)), "model": str(model_path),
                      "model_cfg": cfg.model.model_dump(mode="json", exclude={"cache_dir"}), "grpo": grpo})


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:06d}"


def save_checkpoint(folder: Path, policy, weights: dict[str, torch.Tensor] | None,
                    optimizer_state: dict[str, Any], scheduler, scaler, state: TrainState, keep: int) -> Path:
    """weights: gather_trained's (None: the model's own); optimizer_state: gather_optimizer's.
    The newest `keep` checkpoints stay, and the best one (state.best_global_step) besides them."""
    final = checkpoint_path(folder, state.step)
    remove_temporaries(folder)  # of a save that was killed: one process writes a run's checkpoints
    with atomic_folder(final) as tmp:
        policy.model.save_pretrained(tmp / "model", state_dict=weights)  # adapters alone under LoRA: what export needs
        policy.tokenizer.save_pretrained(tmp / "model")
        torch.save({
            **state.to_dict(),
            "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(),
        }, tmp / "trainer_state.pt")
    best = None if state.best_global_step is None else checkpoint_path(folder, state.best_global_step)
    for old in list_checkpoints(folder)[:-keep]:
        if old != best:
            _remove(old)
    return final


def remove_temporaries(folder: Path) -> list[str]:
    """Delete what a killed save or deletion left behind (`.tmp-*` folders); their names, for the log."""
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith(TEMPORARY))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in stale]


def _remove(path: Path) -> None:
    # renamed out of the checkpoints' name space first: a kill inside rmtree then leaves a .tmp-* folder,
    # which the next save removes, never a step-* folder missing half its files
    doomed = temporary_name(path)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def gather_trained(policy, *, every_process: bool = False) -> dict[str, torch.Tensor] | None:
    """The trained weights as whole tensors (adapters alone under LoRA), from FSDP2's shards: on
    rank 0, in host memory (every_process: on every process, on its device). Every process must
    call it. None for a model that is not sharded: its own state dict is whole."""
    if policy.fsdp is None:
        return None
    from torch.distributed.tensor import DTensor

    if policy.is_peft:
        # one by one: get_model_state_dict(ignore_frozen_params=True) drops a frozen weight under its
        # first name only, so it would gather a tied lm_head (vocabulary x hidden) along with the adapters
        main = every_process or torch.distributed.get_rank() == 0
        adapters = {}
        for name, p in policy.model.named_parameters():
            if p.requires_grad:
                whole = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
                if main:
                    adapters[name] = whole if every_process else whole.cpu()
        return adapters
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=not every_process))
    # a tied weight comes back as one copy per name; save_pretrained drops the tied name only when it is
    # the same tensor, as it is in a whole model
    first: dict[int, str] = {}
    for name, p in policy.model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name and name in weights and kept in weights:
            weights[name] = weights[kept]
    return weights


def gather_optimizer(policy, optimizer) -> dict[str, Any]:
    """The optimizer's state: its own state_dict for a whole model; from FSDP2's shards, whole
    tensors on rank 0 keyed by parameter name (every process must call it)."""
    if policy.fsdp is None:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(policy.model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def newest_checkpoint(folder: Path, *, clean: bool = True) -> Path | None:
    """The checkpoint to resume from. clean: first remove what an interrupted save left (the one
    process that writes checkpoints does)."""
    if clean and (stale := remove_temporaries(folder)):
        log.warning("removed what an interrupted checkpoint save left in %s: %s", folder, ", ".join(stale))
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.pt").is_file())


def load_trained(path: Path, policy) -> None:
    """The checkpoint's trained weights into the policy, whole: before FSDP2 shards it."""
    # mmap: the optimizer state in the same file is not read here
    saved = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    older = saved.get("trainable")  # checkpoints from before model/ was the only copy
    if older is None:
        _load_trained(path, policy)
        return
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, value in older.items():
            params[name].copy_(value.to(params[name].device))


def load_checkpoint(path: Path, policy, optimizer, scheduler, scaler) -> TrainState:
    """Everything but the weights (load_trained), into an optimizer made over the policy as it
    trains now (sharded or whole). Sets this process's RNGs to rank 0's; returns where the run was."""
    saved = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    saved.pop("trainable", None)
    _load_optimizer(path, policy, optimizer, saved.pop("optimizer"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    scaler.load_state_dict(saved.pop("scaler"))
    set_rng_state(saved.pop("rng"))
    return TrainState.from_saved(saved)


def _load_optimizer(path: Path, policy, optimizer, state: dict[str, Any]) -> None:
    """A state keyed by position (a whole model's optimizer.state_dict) or by parameter name
    (gather_optimizer's under FSDP2), into either kind of model."""
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]  # the optimizer's order
    order = [p for group in state["param_groups"] for p in group["params"]]
    by_name = bool(order) and isinstance(order[0], str)
    if (order != names) if by_name else len(order) != len(names):
        raise RuntimeError(f"{path / 'trainer_state.pt'}: its optimizer state is for {len(order)} trained "
                           f"parameters, this model trains {len(names)}; resume with the same model and model section")
    if policy.fsdp is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:
            state = _rekey(state, dict(enumerate(names)))
        set_optimizer_state_dict(policy.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        if by_name:
            state = _rekey(state, {name: i for i, name in enumerate(order)})
        optimizer.load_state_dict(state)


def _rekey(state: dict[str, Any], key: dict) -> dict[str, Any]:
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]]}


def trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trained weights a checkpoint holds, as saved in model/ (peft's names under LoRA)."""
    from safetensors.torch import load_file

    files = sorted((path / "model").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path / 'model'}: no *.safetensors; the checkpoint is incomplete")
    weights: dict[str, torch.Tensor] = {}
    for f in files:  # one file, or the shards of a large model
        weights.update(load_file(f))
    return weights


def _load_trained(path: Path, policy) -> None:
    weights = trained_weights(path)
    if policy.is_peft:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, weights)
        unexpected = result.unexpected_keys
        missing = [n for n, p in policy.model.named_parameters() if p.requires_grad and n in result.missing_keys]
    else:
        params = dict(policy.model.named_parameters())
        missing, unexpected = policy.model.load_state_dict(weights, strict=False)
        loaded = {params[n].data_ptr() for n in weights if n in params}
        # buffers are not saved, nor a tied lm_head: it is the embedding's tensor
        missing = [n for n in missing if n in params and params[n].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"{path / 'model'} does not match the model being trained: missing {missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}; resume with the same model and model section")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
