"""Where each generation comes from: sampled when the trainer needs it (rollout.mode: sync), or
sampled ahead while the trainer trains on the one before (async); with DAPO's dynamic sampling
(grpo.dynamic_sampling) in either mode.

    rollouts = Rollouts(engine, policy, rows, rewards, cfg, plan, dist, sampler)
    sampled = rollouts.next(step, next_at)   # this process's share of the generation to train on now;
                                             # next_at: the optimizer step the one after it is trained at
    rollouts.after_step(step)                # async: starts that one once its weights are there
    rollouts.idle()                          # the engine is free (evaluation during training uses it)
    state.rollouts_ahead = dist.all_gather(rollouts.state_dict())   # a checkpoint: the one sampled ahead

Sync: a generation is sampled by the weights of the step it is first trained at.

Async, staleness s (rollout.max_staleness): generation j+1 starts as soon as generation j is handed
to the trainer, unless that would make its weights more than s optimizer steps older than the
step it is first trained at (w); then it starts at step w - s. Which weights sample which
generation follows from the steps alone, never from timing, so a run is repeatable and a resumed
run samples what the uninterrupted one did: a checkpoint keeps the generation sampled ahead (it
waits for it), and the step the next one starts at. The trainer's loss corrects the lag with
truncated importance sampling against the sampler's own log-probs (grpo.vllm_importance_sampling_*,
which async mode needs on); `rollout/staleness` says how many steps old each step's samples were.

The generation ahead runs in one thread of this process: the engine's work (vLLM's scheduler and
kernels on a CUDA stream of its own; transformers generate on a copy of the model, its frozen
weights shared) overlaps the trainer's, and torch releases the GIL inside both. vLLM's KV cache
stays allocated in async mode (there is no idle time to release it in). docs/async-rollouts.md
says why a thread rather than a process of its own.

Dynamic sampling: groups whose rewards all tie carry no gradient. Each process keeps its
informative groups, and while any process lacks some, every process draws more prompts (the same
number, so the data order stays one order) and samples them, at most grpo.dynamic_sampling_max_draws
generate calls a generation. Groups still missing after that are filled with tied groups whose
completion masks are zeros: nothing of them reaches the loss. Prompts drawn but not trained on go
back to the pool (the ledger counts rows a loss saw).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from grpoflow.batching import MAX_REFILL, BatchPlan
from grpoflow.config import PipelineConfig
from grpoflow.environments import make_environment
from grpoflow.errors import ConfigError
from grpoflow.rewards import RewardSet
from grpoflow.rewards.reward_set import Scores
from grpoflow.rollout import RolloutEngine
from grpoflow.rollout.hf import HFEngine
from grpoflow.rollout.seeded import prompt_seed
from grpoflow.train.distributed import Distributed
from grpoflow.train.generation import Sampled, needs_sampling_logps, sample_groups
from grpoflow.train.sampler import PromptSampler

log = logging.getLogger("grpoflow.train")

MIN_KEEP_RATE = 1 / MAX_REFILL  # a refill draws at most MAX_REFILL x the groups still missing


class Rollouts:
    def __init__(self, engine: RolloutEngine, policy, rows: list[dict[str, Any]], rewards: RewardSet,
                 cfg: PipelineConfig, plan: BatchPlan, dist: Distributed, sampler: PromptSampler):
        self.grpo, self.plan, self.dist, self.sampler = cfg.grpo, plan, dist, sampler
        self.rows, self.rewards, self.policy = rows, rewards, policy
        self.per_process = plan.unique_prompts // dist.world_size
        self.ahead_mode = cfg.rollout.mode == "async"
        self.max_staleness = cfg.rollout.max_staleness
        self.logprobs = needs_sampling_logps(engine, self.grpo, stale=self.ahead_mode)
        self.ignore_eos = cfg.rollout.ignore_eos
        self.engine = engine
        self.env, self.max_turns = make_environment(cfg.rollout), cfg.rollout.max_turns
        self.timed = lambda part: contextlib.nullcontext()  # the trainer's StepMeter.timed: where sync time goes
        self._future: Future | None = None  # the generation being sampled ahead
        self._ready: Sampled | None = None  # ... once sampled (or restored from a checkpoint)
        self.start_at: int | None = None  # the step the next generation starts at, if not started yet
        self._drawn_from: dict | None = None  # the sampler before the draws of a generation not yet sampled whole
        if not self.ahead_mode:
            return
        if not self.grpo.vllm_importance_sampling_correction:
            raise ConfigError("rollout.mode: async samples from weights up to rollout.max_staleness steps old, "
                              "which grpo.vllm_importance_sampling_correction corrects for; set it to true, or "
                              "rollout.mode: sync")
        if getattr(policy, "fsdp", None) is not None:
            raise ConfigError("rollout.mode: async does not run under grpo.distributed: fsdp yet (the weights "
                              "handed to the sampler are gathered from every process); use grpo.distributed: ddp")
        if engine.name == "hf":
            self.engine = SnapshotEngine(engine, policy)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grpoflow-rollouts")
        # collectives of the thread ahead (dynamic sampling) go over a group of their own
        self._coll = dist.side_channel()
        # high: decoding (latency-bound, few blocks a kernel) goes before the training pass's queued blocks
        priority = -1 if cfg.rollout.async_priority == "high" else 0  # lower runs first
        self._stream = torch.cuda.Stream(device=dist.device, priority=priority) if dist.device.type == "cuda" else None
        if self._stream is not None and callable(getattr(self.engine, "use_stream", None)):
            self.engine.use_stream(self._stream)  # vLLM in this process: every generate call on the stream
        log.info("rollouts: async, weights at most %d optimizer step(s) old%s", self.max_staleness,
                 "" if engine.name == "hf" else "; vLLM's KV cache stays allocated")

    # -- what the trainer calls --------------------------------------------------------------------

    def next(self, step: int, next_at: int) -> Sampled:
        """This process's share of the generation trained on from `step` on. next_at: the step the
        generation after it is first trained at."""
        waited = time.perf_counter()
        if self._future is not None:
            self._ready, self._future = self._future.result(), None
        if self._ready is not None:
            sampled, self._ready = self._ready, None
            sampled.wait_seconds = time.perf_counter() - waited
        else:  # sync mode, or the first generation of an async run: sampled now, by the weights of now
            with self.timed("sync"):
                self.engine.sync_weights(self.policy, step)  # vLLM: sample from the policy as it is now
            sampled = self._generation(step, self.dist)
            if not self.ahead_mode:
                self.engine.sleep()  # vLLM: the KV cache is released while the trainer works
        self.start_at = None
        if self.ahead_mode and next_at < self.grpo.max_steps:  # a generation never trained on is not sampled
            self.start_at = max(step, next_at - self.max_staleness)
            self.after_step(step)
        return sampled

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (and at a hand-over): start the generation ahead if it is due."""
        if self.start_at is None or step < self.start_at or self._future is not None:
            return
        self.start_at = None
        with self.timed("sync"):
            self.engine.sync_weights(self.policy, step)  # the thread is idle: nothing reads the engine's weights
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record()  # the weights just written, before the thread's stream reads them
        self._future = self._pool.submit(self._ahead, step, ready)

    def idle(self) -> None:
        """Wait for the generation ahead, keeping it: the engine is then free for another use."""
        if self._future is not None:
            self._ready, self._future = self._future.result(), None

    def state_dict(self) -> dict[str, Any] | None:
        """For a checkpoint: the generation sampled ahead (waited for) and the step the next one starts at."""
        self.idle()
        if self._ready is None and self.start_at is None:
            return None
        return {"ready": self._ready, "start_at": self.start_at}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._ready = None if state is None else state["ready"]
        self.start_at = None if state is None else state["start_at"]

    def lost(self, undo_from: dict | None = None) -> None:
        """The engine (a rollout server) failed. The generation it was sampling is dropped and its
        prompts put back (the sampler as before its draws), to be drawn again on resume; with
        `undo_from` (the sampler before the first generation a step that is undone trained on), every
        generation drawn since goes back too. One sampled whole and not yet trained on stays
        otherwise, for the checkpoint."""
        if self._future is not None:
            try:
                self._ready = self._future.result()  # sampled whole after all (the failure was elsewhere)
            except Exception:  # noqa: BLE001  the failure being handled, or one like it
                pass
            self._future = None
        back_to = undo_from or self._drawn_from
        if back_to is not None:
            self.sampler.load_state_dict(back_to)
            self._ready = None  # drawn after back_to
        self._drawn_from, self.start_at = None, None

    def close(self) -> None:
        if self.ahead_mode:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # -- sampling ------------------------------------------------------------------------------------

    def _ahead(self, step: int, ready) -> Sampled:
        if self._stream is None:
            return self._generation(step, self._coll)
        self._stream.wait_event(ready)
        with torch.cuda.stream(self._stream):
            return self._generation(step, self._coll)

    def _generation(self, version: int, coll: Distributed) -> Sampled:
        self._drawn_from = self.sampler.state_dict()  # lost(): the prompts go back if this generation fails
        sampled = self._sample(version, coll)
        sampled.drawn_from, self._drawn_from = self._drawn_from, None
        return sampled

    def _sample(self, version: int, coll: Distributed) -> Sampled:
        """Draw prompts and sample them (refilling tied groups with dynamic sampling). Every process
        calls it: the draws are the same everywhere, each process samples its block of them."""
        grpo, dist, n = self.grpo, self.dist, self.per_process
        dynamic = grpo.dynamic_sampling
        kept: list[tuple[int, list, Scores]] = []  # (row, completions, scores) of the groups trained on
        tied: list[tuple[int, list, Scores]] = []  # dropped ones, the fill if the draws come up short
        parts: list[Scores] = []
        seconds, phases, calls, generated, count, rounds = 0.0, {}, 0, 0, self.plan.unique_prompts, 0
        while True:
            rounds += 1  # the same on every process (calls: this process's generate calls)
            first = self.sampler.drawn
            prompts = self.sampler.take(count)  # every process draws them all, and samples its block
            per = count // dist.world_size
            mine = prompts[dist.rank * per:(dist.rank + 1) * per]
            if len(kept) < n:
                seeds = [prompt_seed(grpo.seed, first + dist.rank * per + i) for i in range(per)]
                part = sample_groups(self.engine, [self.rows[i] for i in mine], mine, self.rewards, grpo,
                                     seeds=seeds, logprobs=self.logprobs, ignore_eos=self.ignore_eos, env=self.env,
                                     max_turns=self.max_turns)
                seconds, phases, calls, generated = seconds + part.seconds, part.phases, calls + 1, generated + len(mine)
                parts.append(part.scores)
                if not dynamic:
                    part.version = version
                    return part
                for g, group in enumerate(part.groups):
                    scores = _take(part.scores, g, grpo.num_generations)
                    (kept if _informative(scores) and len(kept) < n else tied).append((part.rows[g], group, scores))
            missing = n - len(kept)
            if not coll.any_true(missing > 0) or rounds >= grpo.dynamic_sampling_max_draws:
                break
            # the next draw: what the process that lacks most still lacks, over the share it has kept so far
            rate = max(len(kept) / max(1, generated), MIN_KEEP_RATE)
            want = math.ceil(missing / rate) if missing > 0 else 0
            count = max(coll.all_gather(want)) * dist.world_size
        short = n - len(kept)
        groups = kept + tied[:short]
        return Sampled(rows=[r for r, _, _ in groups], groups=[g for _, g, _ in groups],
                       scores=_concat([s for _, _, s in groups]), seconds=seconds, phases=phases, version=version,
                       masked=[False] * len(kept) + [True] * short, drawn=_concat(parts),
                       dynamic={"draws": float(calls), "prompts_drawn": float(generated),
                                "groups_dropped": float(generated - len(kept)), "groups_masked": float(short)})


def _informative(scores: Scores) -> bool:
    """Do the group's rewards differ (among completions some reward applied to)? Else every advantage is 0."""
    valid = [t for i, t in enumerate(scores.totals) if any(v[i] is not None for v in scores.per_reward.values())]
    return len(valid) >= 2 and max(valid) - min(valid) > 1e-8


def _take(scores: Scores, group: int, G: int) -> Scores:
    cut = slice(group * G, (group + 1) * G)
    return Scores({k: v[cut] for k, v in scores.per_reward.items()}, scores.totals[cut],
                  {k: 0 for k in scores.errors})


def _concat(parts: list[Scores]) -> Scores:
    names = list(parts[0].per_reward)
    return Scores({k: [v for p in parts for v in p.per_reward[k]] for k in names},
                  [t for p in parts for t in p.totals], {k: sum(p.errors[k] for p in parts) for k in names})


class SnapshotEngine(HFEngine):
    """transformers generate in rollout.mode async: the policy trains while it samples, so the sampler
    is a copy of the model whose trained weights are copied over at each start (its frozen
    weights are the policy's own tensors, not copies)."""

    def __init__(self, engine: HFEngine, policy):
        try:
            model = copy.deepcopy(policy.model)
        except Exception as e:  # a quantized (QLoRA) model
            raise ConfigError(f"rollout.mode: async with the transformers engine copies the model, and this one "
                              f"({type(policy.model).__name__}) could not be copied ({e}); use the vLLM engine "
                              f"or rollout.mode: sync") from e
        self._pairs = []
        for mine, theirs in zip(model.parameters(), policy.model.parameters()):
            if theirs.requires_grad:
                self._pairs.append((mine, theirs))
            else:
                mine.data = theirs.data  # shared, never written
            mine.requires_grad_(False)
        super().__init__(model, engine.tokenizer, batch_size=engine.batch_size, progress=False,
                         autocast=engine.autocast)

    def sync_weights(self, policy, step: int) -> None:
        with torch.no_grad():
            for mine, theirs in self._pairs:
                mine.copy_(theirs)
