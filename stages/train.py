"""GRPO training, top to bottom.

    set up: policy (full / LoRA / QLoRA), optimizer, schedule, rewards, rollout engine
    resume from the newest checkpoint, or warm the format up first
    for step in range(max_steps):
        for each micro-step of the optimizer step:
            take the next micro-batch of the current generation (generate a new one when used up)
            loss = grpo_loss(policy log-probs, sampling log-probs, advantages)  ->  backward
        clip, skip if non-finite, optimizer step, schedule step, log, checkpoint

Generation follows TRL's batching (grpoflow/batching.py, `grpoflow explain-batches`): one
generation holds `unique_prompts` x `num_generations` completions, trained on as
`steps_per_generation` micro-batches, `num_iterations` times over.

Under torchrun (or accelerate launch) each of the N processes holds a replica of the policy (DDP)
or 1/N of it (`grpo.distributed: fsdp`, FSDP2): every process draws the same prompts, generates
and scores its block of them (whole groups) with its own engine, and trains on those rows;
advantages and metrics are over the whole generation, dapo divides by its token count over all
processes, rank 0 logs and checkpoints (grpoflow/train/distributed.py). Sampling is seeded per
prompt (the transformers engine; vLLM with rollout.seed_per_prompt), so the completions, and the
steps, are those of a 1-process run with the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from grpoflow.atomic import atomic_folder
from grpoflow.batching import BatchPlan
from grpoflow.config import ConfigError, PipelineConfig
from grpoflow.errors import TrainingDiverged
from grpoflow.rewards import RewardSet
from grpoflow.rollout.hf import HFEngine
from grpoflow.rollout.load import resolve_engine
from grpoflow.rollout.seeded import prompt_seed
from grpoflow.train.checkpoint import (checkpoint_path, gather_optimizer, gather_trained, list_checkpoints,
                                       load_checkpoint, load_trained, remove_temporaries, rng_state, save_checkpoint,
                                       set_rng_state)
from grpoflow.train.distributed import Distributed, setup_distributed, shard_fsdp, wrap_ddp
from grpoflow.train.log import RunLogger
from grpoflow.train.logps import completion_logps, loss_function
from grpoflow.train.model import Policy, load_policy, make_optimizer, make_scaler, make_scheduler
from grpoflow.train.rollouts import GenerationBatch, generate_batch, importance_weights
from grpoflow.train.sampler import PromptSampler
from grpoflow.train.warmup import run_format_warmup

log = logging.getLogger("grpoflow.train")

# Steps over which frac_reward_zero_std is watched; near 1 throughout means no learning signal.
ZERO_STD_WINDOW = 5
ZERO_STD_ALARM = 0.9


@dataclass
class TrainResult:
    output_dir: str
    model_dir: str  # the final adapters (LoRA) or model (full) for evaluation and export; "" if not finished
    steps: int
    report: dict[str, Any]
    finished: bool = True  # False: stopped at stop_after_s with a checkpoint; the same call resumes


def run_train(cfg: PipelineConfig, train_path: Path, heldout_path: Path, model_path: str, *,
              progress: bool = True, stop_after_s: float | None = None) -> TrainResult:
    """stop_after_s: checkpoint and return (finished=False) after the first step that ends past
    this many seconds from the call, for jobs with a time limit; calling again resumes there."""
    stop_at = None if stop_after_s is None else time.monotonic() + stop_after_s
    grpo = cfg.grpo
    dist = setup_distributed()  # one process, or this one of torchrun's
    engine_name = resolve_engine(cfg.rollout)
    plan = BatchPlan.from_config(grpo, num_processes=dist.world_size)
    plan.check_groups_stay_on_one_process()
    per_process = plan.unique_prompts // dist.world_size  # prompts this process generates each generation
    rows = pq.read_table(train_path).to_pylist()
    heldout_prompts = [r["prompt"] for r in pq.read_table(heldout_path).slice(0, grpo.warmup.eval_prompts).to_pylist()]
    out = Path(grpo.output_dir) / _run_key(cfg, train_path, model_path, dist.world_size)[:16]
    out.mkdir(parents=True, exist_ok=True)
    final_dir = out / "final"
    if (final_dir / "report.json").is_file():
        log.info("training is done already: %s (same data, model and config)", final_dir)
        report = json.loads((final_dir / "report.json").read_text())
        return TrainResult(str(out), str(final_dir), report["steps"], report)

    _seed_everything(grpo.seed)
    sharded = _fsdp(grpo, dist)
    policy = load_policy(cfg.model, grpo, model_path, dist.device, to_device=not sharded)
    if dist.is_main and (stale := remove_temporaries(out / "checkpoints")):
        log.warning("removed what an interrupted checkpoint save left in %s: %s", out / "checkpoints", ", ".join(stale))
    checkpoints = list_checkpoints(out / "checkpoints")
    resume_from = checkpoints[-1] if grpo.resume_from_checkpoint and checkpoints else None
    if resume_from:
        load_trained(resume_from, policy)  # whole tensors into the whole model, before any sharding
    if sharded:  # before the optimizer, which must hold the shards
        policy.fsdp = shard_fsdp(policy.model, dist, policy.dtype)
    optimizer = make_optimizer(policy, grpo)
    scheduler = make_scheduler(optimizer, grpo)
    scaler = make_scaler(policy)
    rewards = RewardSet(grpo.reward_funcs, grpo.reward_weights)
    # one generate call per generation (all its prompts), and the warm-up's format check in one call too
    engine = _rollout_engine(engine_name, cfg, policy, model_path,
                             batch_size=max(per_process, grpo.warmup.eval_prompts),
                             completions=per_process * grpo.num_generations)
    sampler = PromptSampler(len(rows), grpo.seed)
    ref_model = _reference_model(policy, model_path, dist) if grpo.beta > 0 and not policy.is_peft else None
    # old log-probs are needed once the policy moves between sampling and training on a row
    need_old_logps = grpo.num_iterations > 1 or plan.steps_per_generation > grpo.gradient_accumulation_steps

    step, buffer, next_micro = 0, None, 0
    nonfinite_in_row, skipped_steps, warmup_report = 0, 0, None
    if resume_from:
        saved = load_checkpoint(resume_from, policy, optimizer, scheduler, scaler)
        step, next_micro = saved["step"], saved["next_micro"]
        nonfinite_in_row, skipped_steps = saved["nonfinite_in_row"], saved["skipped_steps"]
        warmup_report = saved["warmup"]
        sampler.load_state_dict(saved["sampler"])
        buffer = _batch_from_state(_buffer_of_this_process(saved, resume_from, dist.rank, dist.world_size),
                                   policy.device)
        if len(saved.get("rng_by_rank", [])) == dist.world_size:  # load_checkpoint set rank 0's
            set_rng_state(saved["rng_by_rank"][dist.rank])
        log.info("resumed from %s at step %d", resume_from, step)
    elif grpo.warmup.enabled:
        warmup_report = run_format_warmup(policy, engine, rows, heldout_prompts, grpo.warmup,
                                          max_tokens=grpo.max_completion_length,
                                          max_prompt_length=grpo.max_prompt_length, seed=grpo.seed)
    if dist.active and not sharded:
        # DDP: built after the warm-up and the resume, it broadcasts rank 0's weights to every replica
        policy.ddp = wrap_ddp(policy.model, dist)

    def checkpoint(at: int) -> Path:
        # the weights are replicas (or FSDP2's shards, gathered here); each process's unconsumed rows and RNG
        # are its own, so rank 0 saves them all
        weights, optimizer_state = gather_trained(policy), gather_optimizer(policy, optimizer)
        buffers, rngs = dist.all_gather(_batch_to_state(buffer)), dist.all_gather(rng_state())
        state = {"next_micro": next_micro, "nonfinite_in_row": nonfinite_in_row, "skipped_steps": skipped_steps,
                 "warmup": warmup_report, "sampler": sampler.state_dict(), "buffers": buffers, "rng_by_rank": rngs,
                 "num_processes": dist.world_size,
                 "at_generation_boundary": buffer is None or next_micro == plan.micro_steps_per_generation}
        if dist.is_main:
            save_checkpoint(out / "checkpoints", at, policy, weights, optimizer_state, scheduler, scaler, state,
                            keep=grpo.save_total_limit)
        dist.barrier()
        return checkpoint_path(out / "checkpoints", at)

    logger = RunLogger(out, resume_step=step, report_to=grpo.report_to, run_name=out.name,
                       config=cfg.model_dump(mode="json"), write=dist.is_main)
    log.info("GRPO: %d steps; each generation %d prompts x %d completions, %d micro-batches of %d, %d iteration(s)",
             grpo.max_steps, plan.unique_prompts, grpo.num_generations, plan.steps_per_generation,
             grpo.per_device_train_batch_size, grpo.num_iterations)
    bar = Progress(TextColumn("GRPO"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                   TextColumn("reward {task.fields[reward]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not progress or not dist.is_main)  # stdout: results
    with bar:
        task = bar.add_task("train", total=grpo.max_steps, completed=step, reward="-")
        while step < grpo.max_steps:
            started = time.perf_counter()
            peaks = _PhasePeaks(policy.device)
            micro_metrics: list[dict[str, float]] = []
            train_seconds, train_tokens, sync_seconds = 0.0, 0, 0.0
            for micro_step in range(grpo.gradient_accumulation_steps):
                if buffer is None or next_micro == plan.micro_steps_per_generation:
                    # every process draws the whole generation's prompts and takes its block of them
                    first, drawn = dist.rank * per_process, sampler.drawn
                    prompts = sampler.take(plan.unique_prompts)[first:first + per_process]
                    seeds = [prompt_seed(grpo.seed, drawn + first + i) for i in range(per_process)]
                    sync_started = time.perf_counter()
                    engine.sync_weights(policy, step)  # vLLM: sample from the policy as it is now
                    sync_seconds += time.perf_counter() - sync_started
                    buffer = generate_batch(engine, policy, [rows[i] for i in prompts], rewards, grpo,
                                            need_old_logps=need_old_logps, micro_batch=grpo.per_device_train_batch_size,
                                            seeds=seeds, dist=dist)
                    engine.sleep()  # vLLM: the KV cache is released while the trainer works
                    peaks.end("generation")
                    next_micro = 0
                    if (step + 1) % grpo.log_completions_steps == 0:
                        logger.log_completions(step + 1, [s for part in dist.all_gather(buffer.samples) for s in part])
                chunk = next_micro % plan.steps_per_generation
                size = grpo.per_device_train_batch_size
                micro = buffer.slice(chunk * size, (chunk + 1) * size)
                next_micro += 1
                micro_started = time.perf_counter()
                with policy.no_sync(skip=micro_step < grpo.gradient_accumulation_steps - 1):
                    loss, metrics = _micro_step_loss(policy, micro, buffer, grpo, ref_model)
                    scaler.scale(loss).backward()
                micro_metrics.append({"loss": loss.item(), **metrics})  # .item() waits for the GPU
                train_seconds += time.perf_counter() - micro_started
                train_tokens += int(micro["attention_mask"].sum())  # prompt + completion tokens through the model
                peaks.end("train")

            optimizer_started = time.perf_counter()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), grpo.max_grad_norm).item()
            # every process takes the same branch (the gradients are all-reduced; the losses are not)
            finite = dist.all_true(math.isfinite(grad_norm) and all(math.isfinite(m["loss"]) for m in micro_metrics))
            if finite:
                scaler.step(optimizer)
                nonfinite_in_row = 0
            else:
                skipped_steps += 1
                nonfinite_in_row += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if policy.device.type == "cuda":
                torch.cuda.synchronize()  # the optimizer's kernels are queued: time them here, not in the next phase
            optimizer_seconds = time.perf_counter() - optimizer_started
            peaks.end("optimizer")
            step += 1

            # reward metrics are those of the generation this step trained on (one generation may feed
            # several steps), as TRL logs them
            record = {**_mean_metrics(micro_metrics), **buffer.metrics, "grad_norm": grad_norm,
                      "learning_rate": scheduler.get_last_lr()[0], "step_seconds": time.perf_counter() - started,
                      "train/tokens_per_second": train_tokens / train_seconds if train_seconds else 0.0,
                      # where the step's time went (generation/seconds: sampling, rewards, advantages)
                      "time/weight_sync_seconds": sync_seconds, "time/train_seconds": train_seconds,
                      "time/optimizer_seconds": optimizer_seconds,
                      "skipped_steps": skipped_steps, **peaks.metrics()}
            record = dist.reduce_metrics(record)  # one record for all processes
            if step % grpo.logging_steps == 0 or step == grpo.max_steps:
                logger.log(step, record)
            if dist.is_main:
                _watch_signal(logger.history, step)
            bar.update(task, completed=step, reward=f"{record.get('reward', float('nan')):.3f}")

            if nonfinite_in_row >= grpo.max_nonfinite_steps:
                path = checkpoint(step)
                raise TrainingDiverged(
                    f"{nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient (step {step}); "
                    f"checkpoint kept at {path}. Lower grpo.learning_rate or grpo.max_grad_norm, or set model.dtype "
                    f"to bfloat16 or float32 if it is float16.")
            past_deadline = dist.any_true(stop_at is not None and time.monotonic() >= stop_at)
            if step % grpo.save_steps == 0 or step == grpo.max_steps or past_deadline:
                path = checkpoint(step)
                logger.plot()
            if past_deadline and step < grpo.max_steps:
                log.info("stopped at step %d of %d after %.0fs (stop_after_s); checkpoint %s: run again to resume",
                         step, grpo.max_steps, stop_after_s, path)
                return TrainResult(str(out), "", step, {"steps": step, "checkpoint": str(path)}, finished=False)

    weights = gather_trained(policy)  # FSDP2's shards, whole on rank 0; None otherwise
    if dist.is_main:
        _save_final(out, policy, weights, logger, warmup_report, step, skipped_steps, cfg)
    dist.barrier()
    return TrainResult(str(out), str(final_dir), step, json.loads((final_dir / "report.json").read_text()))


def _fsdp(grpo, dist: Distributed) -> bool:
    """grpo.distributed: fsdp under torchrun. One process has nothing to shard over: it trains the
    whole model, the run a sharded one is checked against (its checkpoints are the same)."""
    if grpo.distributed != "fsdp":
        return False
    if not dist.active:
        log.info("grpo.distributed: fsdp in one process: nothing to shard over, the policy trains whole "
                 "(start several processes with torchrun to shard it)")
    return dist.active


def _rollout_engine(name: str, cfg: PipelineConfig, policy, model_path: str, *, batch_size: int,
                    completions: int):
    """batch_size: prompts a transformers generate call; completions: what vLLM runs at once."""
    if name == "hf":  # generates with the policy itself (its weights gathered for each call when sharded)
        return HFEngine(policy.model, policy.tokenizer, batch_size=batch_size, progress=False,
                        autocast=policy.autocast, generate=policy.generate)
    from grpoflow.rollout.vllm import VLLMEngine

    grpo, rollout = cfg.grpo, cfg.rollout
    engine = VLLMEngine(model_path, policy.tokenizer, dtype=cfg.model.dtype,
                        gpu_memory_utilization=rollout.gpu_memory_utilization,
                        max_model_len=rollout.max_model_len or grpo.max_prompt_length + grpo.max_completion_length,
                        seed=grpo.seed, lora_rank=cfg.model.lora.r if policy.is_peft else None, sleep=rollout.sleep,
                        enforce_eager=rollout.enforce_eager, seed_per_prompt=rollout.seed_per_prompt,
                        batch=completions)
    if policy.is_peft and rollout.share_weights:
        if policy.fsdp is None:
            engine.share_weights(policy)
        else:  # vLLM needs whole tensors; the policy holds 1/N of each
            log.info("rollout.share_weights: not under grpo.distributed: fsdp (the policy's base weights are "
                     "shards); vLLM keeps its own copy")
    return engine


def _micro_step_loss(policy: Policy, micro: dict[str, Any], buffer: GenerationBatch, grpo,
                     ref_model: Policy | None) -> tuple[torch.Tensor, dict]:
    T = buffer.completion_len
    ref_logps = None
    if grpo.beta > 0:  # before the training forward: a sharded policy gives its gathered weights back after this
        with torch.no_grad(), policy.autocast():
            if ref_model is None:  # LoRA: the reference is the base, the adapters switched off
                with policy.model.disable_adapter():
                    ref_logps, _ = policy.run(completion_logps, micro["input_ids"], micro["attention_mask"], T,
                                              temperature=grpo.temperature, kernels=grpo.kernels)
            else:
                ref_logps, _ = ref_model.run(completion_logps, micro["input_ids"], micro["attention_mask"], T,
                                            temperature=grpo.temperature, kernels=grpo.kernels)
        ref_logps = ref_logps.float()
    with policy.autocast():
        logps, entropy = policy.train_logps(micro["input_ids"], micro["attention_mask"], T,  # [b, T]
                                            temperature=grpo.temperature, with_entropy=True, kernels=grpo.kernels)
    mask = micro["completion_mask"]
    is_weights, is_metrics = micro["is_weights"], {}
    if micro["sampling_logps"] is not None:  # on-policy samples of another engine: this pass is the trainer's view
        is_weights, is_metrics = importance_weights(logps, micro["sampling_logps"], mask,
                                                    grpo.vllm_importance_sampling_cap)
    grpo_loss = loss_function(grpo.kernels, logps.device)
    loss, metrics = grpo_loss(
        logps.float(), micro["old_logps"], ref_logps, micro["advantages"], mask,
        loss_type=grpo.loss_type, epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, delta=grpo.delta,
        beta=grpo.beta, importance_sampling_level=grpo.importance_sampling_level,
        max_completion_length=grpo.max_completion_length,
        # DDP averages the processes' gradients: each divides by its share of the generation's tokens
        num_items_in_batch=buffer.num_items / buffer.num_processes, is_weights=is_weights)
    if grpo.loss_type != "dapo":
        # dapo already divides by the tokens of the whole generation; the others are per micro-batch means
        loss = loss / grpo.gradient_accumulation_steps
    active = mask.sum()
    metrics["entropy"] = ((entropy * mask).sum() / active.clamp(min=1)).item()
    return loss, {**{k: float(v) for k, v in metrics.items()}, **is_metrics}


class _PhasePeaks:
    """Peak GPU memory of each phase of a step (generation, loss + backward, optimizer step):
    memory/peak_gib says how much, these say which phase sets it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peaks: dict[str, float] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def end(self, phase: str) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)
            torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> dict[str, float]:
        if not self.peaks:
            return {}
        return {"memory/peak_gib": max(self.peaks.values()),
                **{f"memory/{phase}_peak_gib": peak for phase, peak in self.peaks.items()}}


def _watch_signal(history: list[dict], step: int) -> None:
    """Say early and plainly when GRPO has nothing to learn from."""
    if step != ZERO_STD_WINDOW:
        return
    recent = [r["frac_reward_zero_std"] for r in history[-ZERO_STD_WINDOW:] if r.get("frac_reward_zero_std") is not None]
    if recent and min(recent) >= ZERO_STD_ALARM:
        log.warning(
            "no learning signal: in the first %d steps at least %.0f%% of the groups had the same reward for every "
            "completion (frac_reward_zero_std), so their advantages are zero. Enable grpo.warmup (format warm-up), "
            "add a reward that separates completions (xmlcount, soft_format, proximity), raise grpo.num_generations "
            "or grpo.temperature, or use easier prompts.", ZERO_STD_WINDOW, 100 * ZERO_STD_ALARM)


def _save_final(out: Path, policy, weights: dict | None, logger: RunLogger, warmup_report, steps: int, skipped: int,
                cfg: PipelineConfig) -> Path:
    final = out / "final"
    plot = logger.plot()
    history = logger.history
    last = history[-min(len(history), 10):] if history else []
    report = {
        "steps": steps, "skipped_steps": skipped, "finetune": cfg.model.finetune, "base_model": str(cfg.model.name_or_path),
        "warmup": warmup_report,
        "reward_first_10": _mean_key(history[:10], "reward"), "reward_last_10": _mean_key(last, "reward"),
        "step_seconds_median": float(np.median([r["step_seconds"] for r in history])) if history else None,
        "metrics": str(logger.metrics_path), "plot": str(plot) if plot else None,
    }
    with atomic_folder(final) as tmp:
        # adapters only under LoRA (save_lora); the whole model otherwise; weights: gathered from FSDP2's shards
        policy.model.save_pretrained(tmp, state_dict=weights)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("training done: %d steps, reward %s -> %s; model in %s", steps, _fmt(report["reward_first_10"]),
             _fmt(report["reward_last_10"]), final)
    return final


def _reference_model(policy: Policy, model_path: str, dist: Distributed) -> Policy:
    """The frozen base model for the KL term (full fine-tuning), sharded as the policy is."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=policy.dtype).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    reference = Policy(ref, policy.tokenizer, policy.device, policy.dtype, is_peft=False)
    if policy.fsdp is not None:
        reference.fsdp = shard_fsdp(ref, dist, policy.dtype, "KL reference")
    else:
        ref.to(policy.device)
    return reference


def _batch_to_state(batch: GenerationBatch | None) -> dict | None:
    if batch is None:
        return None
    return {f.name: (v.cpu() if isinstance(v := getattr(batch, f.name), torch.Tensor) else v) for f in fields(batch)}


def _buffer_of_this_process(saved: dict, path: Path, rank: int, world_size: int) -> dict | None:
    """This process's unconsumed rows of the checkpoint's generation. On another number of
    processes the rows would have to be dealt out again: resumable at a generation boundary only."""
    buffers = saved.get("buffers", [saved.get("buffer")])  # one process's, before data parallelism
    if len(buffers) == world_size:
        return buffers[rank]
    if saved.get("at_generation_boundary", all(b is None for b in buffers)):
        return None  # used up: the next generation is drawn for this number of processes
    raise ConfigError(
        f"{path} stopped inside a generation (micro-step {saved['next_micro']} of it) on {len(buffers)} "
        f"process(es); this run has {world_size}. Resume it on {len(buffers)} process(es), or from a checkpoint at a "
        f"generation boundary (grpo.save_steps a multiple of the optimizer steps per generation, see "
        f"`grpoflow explain-batches`), or set grpo.resume_from_checkpoint: false to start over.")


def _batch_from_state(state: dict | None, device) -> GenerationBatch | None:
    if state is None:
        return None
    state = {"is_weights": None, "sampling_logps": None, **state}  # checkpoints from before the vLLM engine
    return GenerationBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


def _run_key(cfg: PipelineConfig, train_path: Path, model_path: str, num_processes: int = 1) -> str:
    """Same data, base model and training config: the same run (and its checkpoints). The batch
    counts as its 1-process equivalent (per_device_train_batch_size x processes), so the same
    global batch on another number of processes is the same run and resumes its checkpoints; with
    ddp or fsdp alike (grpo.distributed), whose checkpoints are the same."""
    grpo = cfg.grpo.model_dump(mode="json", exclude={"output_dir", "logging_steps", "log_completions_steps",
                                                    "report_to", "save_steps", "save_total_limit",
                                                    "resume_from_checkpoint", "distributed"})
    grpo["per_device_train_batch_size"] *= num_processes
    key = {"data": hashlib.sha256(Path(train_path).read_bytes()).hexdigest(), "model": str(model_path),
           "model_cfg": cfg.model.model_dump(mode="json", exclude={"cache_dir"}), "grpo": grpo}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the micro-batches that have it (a micro-batch of masked rows has no
    importance-sampling figures)."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def _mean_key(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
