"""GRPO training, top to bottom, as a recipe: `setup`, then `train` calls the named steps.

    setup: policy (full / LoRA / QLoRA), optimizer, schedule, rewards, rollout engine;
           resume from the newest checkpoint, or warm the format up first
    train: for step in range(max_steps):
               micro_step x gradient_accumulation_steps   (next_generation when the current one is used up)
               optimizer_step                              (clip; skip if non-finite)
               log, evaluate (grpo.eval_strategy), save_checkpoint (sparing the best one)
           final/: the last step's model, or the best checkpoint's (grpo.load_best_model_at_end)

Generation follows TRL's batching (grpoflow/batching.py, `grpoflow explain-batches`): one
generation holds `unique_prompts` x `num_generations` completions, trained on as
`steps_per_generation` micro-batches, `num_iterations` times over. A checkpoint holds a
TrainState (grpoflow/train/checkpoint.py): the loop resumes exactly where it stopped.

Under torchrun each process trains on its block of every generation (whole groups) with a
replica of the policy (DDP) or 1/N of it (FSDP2), and the steps are those of one process with the
same global batch: grpoflow/train/distributed.py says how.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import torch

from grpoflow.atomic import atomic_folder
from grpoflow.batching import BatchPlan, with_max_steps
from grpoflow.config import PipelineConfig
from grpoflow.errors import ConfigError, RolloutServerError, TrainingDiverged
from grpoflow.progress import Heartbeat, bar_draws, duration
from grpoflow.rewards import RewardSet
from grpoflow.rollout.load import largest_call_for, make_engine, resolve_engine, shares_base_weights
from grpoflow.stopping import StopRequested, stop_requested
from grpoflow.train.checkpoint import (
    TrainState,
    batch_from_state,
    batch_to_state,
    checkpoint_path,
    gather_optimizer,
    gather_trained,
    load_checkpoint,
    load_trained,
    newest_checkpoint,
    rng_state,
    run_key,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from grpoflow.train.distributed import setup_distributed, shard_fsdp, wrap_ddp
from grpoflow.train.generation import build_batch
from grpoflow.train.log import RunLogger, StepMeter, describe_reward, fmt_value, step_progress, warn_if_no_signal
from grpoflow.train.loss import forward_share, mean_metrics, micro_step_loss, reference_model, token_weighted
from grpoflow.train.memory import breakdown as memory_breakdown, check_fits, out_of_memory, use_expandable_segments
from grpoflow.train.periodic_eval import PeriodicEval, plot_eval
from grpoflow.train.policy import load_policy, make_optimizer, make_scaler, make_scheduler
from grpoflow.train.rollouts import Rollouts
from grpoflow.train.sampler import PromptSampler
from grpoflow.train.warmup import run_format_warmup
from grpoflow.verifiers.verdicts import in_format

log = logging.getLogger("grpoflow.train")

# final/trained_ids.json: the ids of the training rows a loss saw (a row drawn but not reached by the
# last step is not among them); what the continuous flow's ledger records
TRAINED_IDS = "trained_ids.json"


@dataclass
class TrainResult:
    output_dir: str
    model_dir: str  # the final adapters (LoRA) or model (full) for evaluation and export; "" if not finished
    steps: int
    report: dict[str, Any]
    finished: bool = True  # False: stopped at stop_after_s with a checkpoint; the same call resumes

    def as_json(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "model": self.model_dir, "finished": self.finished, **self.report}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        report = {k: v for k, v in data.items() if k not in ("output_dir", "model", "finished")}
        return cls(data["output_dir"], data["model"], report["steps"], report, data["finished"])


def run_train(cfg: PipelineConfig, train_path: Path, heldout_path: Path, model_path: str, *,
              progress: bool = True, stop_after_s: float | None = None) -> TrainResult:
    """stop_after_s: checkpoint and return (finished=False) after the first step that ends past
    this many seconds from the call, for jobs with a time limit; calling again resumes there."""
    stop_at = None if stop_after_s is None else time.monotonic() + stop_after_s
    recipe = GRPORecipe(cfg, Path(train_path), Path(heldout_path), model_path)
    if (recipe.final_dir / "report.json").is_file():
        log.info("training is done already: %s (same data, model and config)", recipe.final_dir)
        return recipe.result()
    recipe.setup()
    return recipe.train(progress=progress, stop_at=stop_at)


class GRPORecipe:
    def __init__(self, cfg: PipelineConfig, train_path: Path, heldout_path: Path, model_path: str):
        self.cfg, self.grpo, self.model_path, self.heldout_path = cfg, cfg.grpo, model_path, heldout_path
        expandable = self.grpo.expandable_segments
        if expandable or (expandable is None and cfg.rollout.mode == "async"):  # before the policy's first allocation
            use_expandable_segments()
        self.dist = setup_distributed()  # one process, or this one of torchrun's
        # rollout.placement server: a server generates, perhaps elsewhere; a snapshot of each step's start
        # lets a lost server's step be checkpointed as if it had not begun
        self.serving, self._step_start = cfg.rollout.placement == "server", None
        if not (self.serving and cfg.rollout.server_address):
            resolve_engine(cfg.rollout)  # a rollout.engine that cannot run fails here, before any model loads
        self.plan = BatchPlan.from_config(self.grpo, num_processes=self.dist.world_size)
        self.plan.check_groups_stay_on_one_process()
        self.per_process = self.plan.unique_prompts // self.dist.world_size  # prompts this process generates
        self.rows = pq.read_table(train_path).to_pylist()
        self.cfg = cfg = with_max_steps(cfg, self.plan, len(self.rows))  # grpo.num_train_epochs, in steps
        self.grpo = cfg.grpo
        self.out = Path(self.grpo.output_dir) / run_key(cfg, train_path, model_path, self.dist.world_size)[:16]
        self.out.mkdir(parents=True, exist_ok=True)
        self.final_dir = self.out / "final"
        self.state, self.buffer = TrainState(num_processes=self.dist.world_size), None
        self.heartbeat = Heartbeat(log, "GRPO", enabled=False)  # train() starts one where no bar draws

    # -- set up ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, grpo, dist = self.cfg, self.grpo, self.dist
        seed_everything(grpo.seed)
        self.sharded = grpo.distributed == "fsdp" and dist.active  # one process has nothing to shard over
        self._setup_eval()
        if grpo.distributed == "fsdp" and not dist.active:
            log.info("grpo.distributed: fsdp in one process: nothing to shard over, the policy trains whole "
                     "(start several processes with torchrun to shard it)")
        # LoRA sharing vLLM's weights: the policy waits in host memory until vLLM has loaded its own copy
        shared_later = not self.sharded and shares_base_weights(cfg)
        self.policy = policy = load_policy(cfg.model, grpo, self.model_path, dist.device,
                                           to_device=not (self.sharded or shared_later))
        newest = newest_checkpoint(self.out / "checkpoints", clean=dist.is_main)
        resume_from = newest if grpo.resume_from_checkpoint else None
        if resume_from:
            load_trained(resume_from, policy)  # whole tensors into the whole model, before any sharding
        if self.sharded:  # before the optimizer, which must hold the shards
            policy.fsdp = shard_fsdp(policy.model, dist, policy.dtype)
        self.optimizer = make_optimizer(policy, grpo)
        self.scheduler = make_scheduler(self.optimizer, grpo)
        self.scaler = make_scaler(policy)
        self.rewards = RewardSet(grpo.reward_funcs, grpo.reward_weights)
        # one generate call per generation (all its prompts), and the warm-up's format check in one call too
        per_call = self.per_process * grpo.num_generations
        self.engine = make_engine(
            cfg.rollout, self.model_path, policy=policy, lora_rank=cfg.model.lora.r if policy.is_peft else None,
            dtype=cfg.model.dtype, seed=grpo.seed,
            max_model_len=cfg.rollout.max_model_len or grpo.max_prompt_length + grpo.max_completion_length,
            batch_size=max(self.per_process, grpo.warmup.eval_prompts),
            completions_per_call=per_call, largest_call=largest_call_for(grpo, per_call), dist=dist,
            finetune=cfg.model.finetune)
        if shared_later:  # the base weights are vLLM's now; the adapters and anything not shared follow
            policy.model.to(dist.device)
        self.sampler = PromptSampler(len(self.rows), grpo.seed)
        self.rollouts = Rollouts(self.engine, policy, self.rows, self.rewards, cfg, self.plan, dist, self.sampler)
        # whether the rollout server was lost is agreed over a group of its own: a process that lost it must
        # never be matched with one still inside a collective of the sampling (dynamic sampling's refills)
        self._agreement = dist.side_channel() if self.serving else dist
        self.ref_model = (reference_model(policy, self.model_path, dist)
                          if grpo.beta > 0 and not policy.is_peft else None)
        # old log-probs are needed once the policy moves between sampling and training on a row
        self.need_old_logps = (grpo.num_iterations > 1
                               or self.plan.steps_per_generation > grpo.gradient_accumulation_steps)
        if resume_from:
            self._resume(resume_from)
        elif grpo.warmup.enabled:
            heldout = pq.read_table(self.heldout_path).slice(0, grpo.warmup.eval_prompts).to_pylist()
            rows = self.rows if grpo.warmup.source is None else warmup_rows(cfg)
            self.state.warmup = run_format_warmup(policy, self.engine, rows, [r["prompt"] for r in heldout],
                                                  grpo.warmup, max_tokens=grpo.max_completion_length,
                                                  max_prompt_length=grpo.max_prompt_length, seed=grpo.seed,
                                                  env=self.rollouts.env, max_turns=self.rollouts.max_turns,
                                                  kernels=grpo.kernels)
        if dist.active and not self.sharded:
            # DDP: built after the warm-up and the resume, it broadcasts rank 0's weights to every replica
            policy.ddp = wrap_ddp(policy.model, dist)
        self.logger = RunLogger(self.out, resume_step=self.state.step, report_to=grpo.report_to,
                                run_name=self.out.name, config=cfg.model_dump(mode="json"), write=dist.is_main)

    def _resume(self, path: Path) -> None:
        dist = self.dist
        self.state = load_checkpoint(path, self.policy, self.optimizer, self.scheduler, self.scaler)
        self.sampler.load_state_dict(self.state.sampler)
        self.rollouts.load_state_dict(self.state.rollouts_ahead_of(path, dist.rank, dist.world_size))
        self.buffer = batch_from_state(self.state.buffer_of(path, dist.rank, dist.world_size), self.policy.device)
        if len(self.state.rng_by_rank) == dist.world_size:  # load_checkpoint set rank 0's
            set_rng_state(self.state.rng_by_rank[dist.rank])
        log.info("resumed from %s at step %d", path, self.state.step)

    # -- the loop ----------------------------------------------------------------------------------

    def train(self, *, progress: bool = True, stop_at: float | None = None) -> TrainResult:
        grpo, plan = self.grpo, self.plan
        log.info("GRPO: %d steps; each generation %d prompts x %d completions, %d micro-batches of %d, "
                 "%d iteration(s)", grpo.max_steps, plan.unique_prompts, grpo.num_generations,
                 plan.steps_per_generation, grpo.per_device_train_batch_size, grpo.num_iterations)
        try:
            return self._train(progress=progress, stop_at=stop_at)
        except RolloutServerError as e:
            raise self._server_lost(e) from e
        finally:
            self.rollouts.close()  # a generation sampled ahead that no step will train on is dropped
            if hasattr(self.engine, "close"):
                self.engine.close()  # the rollout server's connection (and the server, if this process started it)

    def _train(self, *, progress: bool, stop_at: float | None) -> TrainResult:
        grpo, state = self.grpo, self.state
        if not self.rollouts.ahead_mode:
            self.engine.sleep()  # vLLM: the KV cache is not there while the trainer works; nor in what is measured
        check_fits(self.policy, grpo, self.plan)  # CUDA: refuse a micro-batch whose layer inputs cannot fit
        # where no bar draws (Prefect, a log file), a line per step and a heartbeat within long steps
        draws = progress and self.dist.is_main and bar_draws()
        bar = step_progress(enabled=draws)
        lines = self.dist.is_main and not draws
        self.heartbeat = Heartbeat(log, "GRPO", enabled=lines)
        with bar, self.heartbeat:
            if self.evaluator is not None and state.step == 0 and not any(r["step"] == 0 for r in self.logger.eval_history):
                # step 0: the policy GRPO starts from (after the format warm-up), the curve's first point
                self.heartbeat.phase("evaluating on the held-out set at step 0")
                self.logger.log_eval(0, self._on_every_process(self.evaluator.evaluate, self.policy, self.engine, 0))
            started, first_step = time.monotonic(), state.step  # the ETA: this call's steps
            task = bar.add_task("train", total=grpo.max_steps, completed=state.step, reward="-")
            while state.step < grpo.max_steps:
                self.heartbeat.phase(f"step {state.step + 1} of {grpo.max_steps}")
                self._step_start = self._snapshot()
                self.meter = StepMeter(self.policy.device, self.engine)
                micro_metrics = [self.micro_step(i) for i in range(grpo.gradient_accumulation_steps)]
                grad_norm = self.optimizer_step(micro_metrics)
                record = self._log_step(micro_metrics, grad_norm)
                self._on_every_process(self.evaluate_if_due)
                # async: the generation ahead starts once its weights are here
                self._on_every_process(self.rollouts.after_step, state.step)
                bar.update(task, completed=state.step, reward=f"{record.get('reward', float('nan')):.3f}")
                if lines:
                    self._progress_line(record, (time.monotonic() - started) / (state.step - first_step))
                if state.nonfinite_in_row >= grpo.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                        f"(step {state.step}); checkpoint kept at {self.save_checkpoint()}. Lower "
                        f"grpo.learning_rate or grpo.max_grad_norm, or set model.dtype to bfloat16 or float32 if "
                        f"it is float16.")
                asked = self.dist.any_true(stop_requested())
                past_deadline = self.dist.any_true(stop_at is not None and time.monotonic() >= stop_at)
                if state.step % grpo.save_steps == 0 or state.step == grpo.max_steps or past_deadline or asked:
                    self._on_every_process(self.rollouts.idle)  # a checkpoint keeps the generation ahead
                    path = self.save_checkpoint()
                    self.logger.plot()
                if asked and state.step < grpo.max_steps:
                    raise StopRequested(f"training stopped at step {state.step} of {grpo.max_steps}, as asked "
                                        f"(SIGTERM); checkpoint {path}: run the same command to resume")
                if past_deadline and state.step < grpo.max_steps:
                    log.info("stopped at step %d of %d (stop_after_s); checkpoint %s: run again to resume",
                             state.step, grpo.max_steps, path)
                    return TrainResult(str(self.out), "", state.step, {"steps": state.step, "checkpoint": str(path)},
                                       finished=False)
        self.load_best_model()
        return self.finish()

    def next_generation(self, micro_index: int) -> None:
        """The next generation, from grpoflow/train/rollouts.py (sampled now, or ahead in rollout.mode
        async): every process draws the whole generation's prompts and generates and scores its
        block of them; here it becomes training tensors, advantages over every process's groups."""
        grpo, dist, step = self.grpo, self.dist, self.state.step
        # the step the generation after this one is first trained at: micro-steps run in order
        next_at = step + (micro_index + self.plan.micro_steps_per_generation) // grpo.gradient_accumulation_steps
        self.rollouts.timed = self.meter.timed
        self.heartbeat.phase(f"step {step + 1} of {grpo.max_steps}: sampling a generation")
        with self._explain_out_of_memory("generation"), torch.profiler.record_function("grpoflow.generation"):
            sampled = self._on_every_process(self.rollouts.next, step, next_at)
        if self._step_start is not None and self._step_start["sampler"] is None:
            self._step_start["sampler"] = sampled.drawn_from  # the step's first generation: undone with the step
        self.buffer = build_batch(sampled, [self.rows[i] for i in sampled.rows], self.policy, self.rewards, grpo,
                                  need_old_logps=self.need_old_logps, micro_batch=grpo.per_device_train_batch_size,
                                  dist=dist, correct=self.rollouts.logprobs)
        # a group masked out of the loss (dynamic sampling came up short) is not a row trained on
        self.buffer.rows = [None if m else i for i, m in zip(sampled.rows, sampled.masked)
                            for _ in range(grpo.num_generations)]
        self.meter.end("generation")
        self.state.next_micro = 0
        if grpo.log_completions and (self.state.step + 1) % grpo.log_completions_steps == 0:
            self.logger.log_completions(self.state.step + 1,
                                        [s for part in dist.all_gather(self.buffer.samples) for s in part])

    def micro_step(self, index: int) -> dict[str, float]:
        """Loss and backward on the next micro-batch (`index` of the optimizer step's); gradients are
        all-reduced on the step's last one."""
        last = index == self.grpo.gradient_accumulation_steps - 1
        if self.buffer is None or self.state.next_micro == self.plan.micro_steps_per_generation:
            self.next_generation(index)
        grpo, buffer = self.grpo, self.buffer
        size = grpo.per_device_train_batch_size
        start = (self.state.next_micro % self.plan.steps_per_generation) * size
        self.heartbeat.phase(f"step {self.state.step + 1} of {grpo.max_steps}: micro-batch {index + 1} of "
                             f"{grpo.gradient_accumulation_steps}")
        self.state.rows_reached.update(r for r in buffer.rows[start:start + size] if r is not None)
        self.state.next_micro += 1
        # one forward, or several of at most grpo.max_tokens_per_forward tokens, each as wide as its rows
        parts = buffer.forward_chunks(start, start + size, grpo.max_tokens_per_forward)
        micro_mask = buffer.completion_mask[start:start + size]
        self.meter.training_starts()
        loss_sum, records = 0.0, []
        with self.meter.timed("train"), self._explain_out_of_memory("training pass"):
            for j, rows in enumerate(parts):
                part = buffer.rows_of(rows)
                share = forward_share(grpo.loss_type, part["completion_mask"], micro_mask)
                # gradients are all-reduced once, on the step's last backward
                with self.policy.no_sync(skip=not (last and j == len(parts) - 1)):
                    loss, metrics = micro_step_loss(self.policy, part, buffer, grpo, self.ref_model)
                    self.scaler.scale(loss * share).backward()
                loss_sum += loss.item() * share  # .item() waits for the GPU
                records.append((float(part["completion_mask"].sum()), metrics))
                self.meter.train_tokens += int(part["attention_mask"].sum())  # prompt + completion tokens
        self.meter.end("train")
        return {"loss": loss_sum, **token_weighted(records)}

    # -- a lost rollout server (rollout.placement server) --------------------------------------------

    def _on_every_process(self, fn, *args):
        """fn(*args); with a rollout server, a server lost by one process is lost by all (they then
        write the checkpoint together)."""
        if not (self.serving and self.dist.active):
            return fn(*args)
        error, result = None, None
        try:
            result = fn(*args)
        except RolloutServerError as e:
            error = e
        if self._agreement.any_true(error is not None):
            raise error or RolloutServerError("another training process lost the rollout server")
        return result

    def _snapshot(self) -> dict[str, Any] | None:
        """What a step changes before its optimizer step, as it was at the step's start."""
        if not self.serving:
            return None
        return {"step": self.state.step, "next_micro": self.state.next_micro, "buffer": self.buffer,
                "rows_reached": set(self.state.rows_reached), "rng": rng_state(), "sampler": None}

    def _server_lost(self, error: RolloutServerError) -> RolloutServerError:
        """Checkpoint the run as the last whole step left it, and say how to go on. A step the server
        was lost in before its optimizer step is undone (its micro-batches' gradients, the rows they
        reached); the generation being sampled is dropped, its prompts drawn again on resume."""
        start = self._step_start
        if start is None:  # lost before this call's first step: nothing new to keep
            return RolloutServerError(f"{error}; no step was trained in this call: run the same command once a "
                                      "rollout server answers")
        undone = self.state.step == start["step"]  # lost before this step's optimizer step: it is undone
        self.rollouts.lost(undo_from=start["sampler"] if undone else None)
        if undone:
            self.state.next_micro, self.buffer = start["next_micro"], start["buffer"]
            self.state.rows_reached = start["rows_reached"]
            set_rng_state(start["rng"])
            self.optimizer.zero_grad(set_to_none=True)
        path = self.save_checkpoint()
        log.error("rollout server lost at step %d of %d; checkpoint %s", self.state.step, self.grpo.max_steps, path)
        return RolloutServerError(f"{error}. Training stopped at step {self.state.step} of {self.grpo.max_steps} "
                                  f"with a checkpoint ({path}): run the same command to resume once a rollout "
                                  "server answers")

    @contextlib.contextmanager
    def _explain_out_of_memory(self, phase: str) -> Iterator[None]:
        """A CUDA out-of-memory becomes an error that names the settings needing less (memory.knobs)."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as e:
            raise out_of_memory(e, self.grpo, self.state.step, phase, self.plan) from e

    def optimizer_step(self, micro_metrics: list[dict[str, float]]) -> float:
        """Clip, then step, or skip a step whose loss or gradient is not finite. The gradient norm."""
        state, scaler, optimizer = self.state, self.scaler, self.optimizer
        with self.meter.timed("optimizer"):
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(),
                                                       self.grpo.max_grad_norm).item()
            # every process takes the same branch (the gradients are all-reduced; the losses are not)
            if self.dist.all_true(math.isfinite(grad_norm) and all(math.isfinite(m["loss"]) for m in micro_metrics)):
                scaler.step(optimizer)
                state.nonfinite_in_row = 0
            else:
                state.skipped_steps += 1
                state.nonfinite_in_row += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        self.meter.end("optimizer")
        state.step += 1
        return grad_norm

    def _log_step(self, micro_metrics: list[dict[str, float]], grad_norm: float) -> dict[str, float]:
        # reward metrics are those of the generation this step trained on (one generation may feed
        # several steps), as TRL logs them
        # this process's block of the generation; an episode's format is its last turn's, as the rewards judge it
        texts = [s.get("last_turn", s["completion"]) for s in self.buffer.samples]
        record = {**mean_metrics(micro_metrics), **self.buffer.metrics, "grad_norm": grad_norm,
                  "completions/strict_format": sum(in_format(texts, strict=True)) / max(1, len(texts)),
                  "learning_rate": self.scheduler.get_last_lr()[0], "skipped_steps": self.state.skipped_steps,
                  **self.meter.metrics(), **memory_breakdown(self.policy, self.optimizer, self.engine)}
        record = self.dist.reduce_metrics(record)  # one record for all processes
        step = self.state.step
        version = record.pop("rollout/version", step - 1)
        if self.rollouts.ahead_mode:  # how many optimizer steps older than the trained ones the sampling weights were
            record["rollout/staleness"] = step - 1 - version
        else:
            record.pop("rollout/wait_seconds", None)
        if step % self.grpo.logging_steps == 0 or step == self.grpo.max_steps:
            self.logger.log(step, record)
        if self.dist.is_main:
            warn_if_no_signal(self.logger.history, step)
        return record

    def _progress_line(self, record: dict[str, float], seconds_per_step: float) -> None:
        """One line per step for logs: what the bar shows on a terminal, and the format rate."""
        step, total = self.state.step, self.grpo.max_steps
        log.info("step %d of %d: reward %s, strict format %.0f%%, step %.1fs, ETA %s", step, total,
                 fmt_value(record.get("reward")), 100 * record["completions/strict_format"], record["step_seconds"],
                 duration((total - step) * seconds_per_step))

    def save_checkpoint(self) -> Path:
        """Every process calls it. The weights are replicas (or FSDP2's shards, gathered here);
        each process's unconsumed rows and RNGs are its own, so rank 0 saves them all."""
        state, dist, policy = self.state, self.dist, self.policy
        self._keep_if_best()
        weights, optimizer_state = gather_trained(policy), gather_optimizer(policy, self.optimizer)
        state.rollouts_ahead = dist.all_gather(self.rollouts.state_dict())  # waits for it: it draws prompts
        state.sampler = self.sampler.state_dict()
        state.buffers, state.rng_by_rank = dist.all_gather(batch_to_state(self.buffer)), dist.all_gather(rng_state())
        state.at_generation_boundary = self.buffer is None or state.next_micro == self.plan.micro_steps_per_generation
        state.num_processes = dist.world_size
        state.rows_reached = self._rows_reached()
        folder = self.out / "checkpoints"
        if dist.is_main:
            save_checkpoint(folder, policy, weights, optimizer_state, self.scheduler, self.scaler, state,
                            keep=self.grpo.save_total_limit)
        dist.barrier()
        return checkpoint_path(folder, state.step)

    # -- evaluation during training (grpoflow/train/periodic_eval.py) ------------------------------

    def _setup_eval(self) -> None:
        grpo = self.grpo
        if grpo.load_best_model_at_end and self.sharded:
            raise ConfigError("grpo.load_best_model_at_end is not supported under grpo.distributed: fsdp on several "
                              "processes yet (a checkpoint's weights load into a whole model); use grpo.distributed: "
                              "ddp, or take the best checkpoint's model/ folder from the run's checkpoints/")
        self.evaluator = (PeriodicEval(self.cfg, self.heldout_path, self.dist)
                          if grpo.eval_strategy == "steps" else None)

    def evaluate_if_due(self) -> None:
        """Every process: the held-out figures of the policy as it is now, into metrics.jsonl."""
        if self.evaluator is not None and self.evaluator.due(self.state.step):
            self.heartbeat.phase(f"evaluating on the held-out set at step {self.state.step}")
            self.rollouts.idle()  # vLLM: the engine answers the held-out prompts once the generation ahead is done
            self.logger.log_eval(self.state.step, self.evaluator.evaluate(self.policy, self.engine, self.state.step))

    def _keep_if_best(self) -> None:
        """Before a checkpoint is saved: is its step the best so far (it then survives pruning)?"""
        if self.evaluator is None:
            return
        if self.evaluator.keep_if_best(self.state):
            log.info("step %d: the best checkpoint so far (%s %.4f)", self.state.step,
                     self.grpo.metric_for_best_model, self.state.best_metric)
        self._eval_facts()

    def _eval_facts(self) -> None:
        """What report.json says of the evaluation during training: its plot and the best checkpoint."""
        state, logger = self.state, self.logger
        if not (self.dist.is_main and logger.eval_history):
            return
        logger.facts["eval_plot"] = str(plot_eval(logger.eval_history, self.out / "eval.png",
                                                  best_step=state.best_global_step))
        if state.best_global_step is not None:
            logger.facts.update(metric_for_best_model=self.grpo.metric_for_best_model, best_metric=state.best_metric,
                                best_global_step=state.best_global_step,
                                best_model_checkpoint=str(checkpoint_path(self.out / "checkpoints",
                                                                          state.best_global_step)))

    def load_best_model(self) -> None:
        """grpo.load_best_model_at_end: the best checkpoint's weights into the policy, which finish()
        writes as final/. Every process loads them (DDP's replicas stay equal)."""
        if self.evaluator is None:
            return
        self._eval_facts()
        best = self.state.best_global_step
        final_step = self.state.step
        if self.grpo.load_best_model_at_end and best is not None and best != self.state.step:
            load_trained(checkpoint_path(self.out / "checkpoints", best), self.policy)
            log.info("load_best_model_at_end: final/ is step %d's model (%s %.4f), not step %d's", best,
                     self.grpo.metric_for_best_model, self.state.best_metric, self.state.step)
            final_step = best
        self.logger.facts["final_model_step"] = final_step

    def finish(self) -> TrainResult:
        """The trained adapters (LoRA) or model (full) and report.json in final/, written once."""
        weights = gather_trained(self.policy)  # FSDP2's shards, whole on rank 0; None otherwise
        reached = self._rows_reached()
        if self.dist.is_main:
            report = self.logger.report(steps=self.state.step, skipped_steps=self.state.skipped_steps,
                                        finetune=self.cfg.model.finetune, base_model=str(self.cfg.model.name_or_path),
                                        warmup=self.state.warmup, rows_offered=len(self.rows),
                                        rows_trained=len(reached))
            with atomic_folder(self.final_dir) as tmp:
                self.policy.model.save_pretrained(tmp, state_dict=weights)  # adapters alone under LoRA
                self.policy.tokenizer.save_pretrained(tmp)
                ids = sorted(str(self.rows[i].get("id", i)) for i in reached)
                (tmp / TRAINED_IDS).write_text(json.dumps(ids) + "\n")
                (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            log.info("training done: %d steps, reward %s; model in %s", self.state.step, describe_reward(report),
                     self.final_dir)
        self.dist.barrier()
        return self.result()

    def _rows_reached(self) -> set[int]:
        """The training rows some process's loss has seen so far: every process's, together."""
        return set().union(*self.dist.all_gather(self.state.rows_reached))

    def result(self) -> TrainResult:
        report = json.loads((self.final_dir / "report.json").read_text())
        return TrainResult(str(self.out), str(self.final_dir), report["steps"], report)


def warmup_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """grpo.warmup.source's prepared training rows (with their worked solutions), prompted as the
    training data is: the same system prompt, the same chat template."""
    from stages.prepare import run_prepare

    data = cfg.data.model_copy(update={"source": cfg.grpo.warmup.source, "answer_format": "gsm8k",
                                       "answer_type": "number", "max_train_rows": None, "max_heldout_rows": None})
    manifest = run_prepare(data)
    log.info("format warm-up rows from %s (%s)", cfg.grpo.warmup.source, manifest.train_path)
    return pq.read_table(manifest.train_path).to_pylist()


