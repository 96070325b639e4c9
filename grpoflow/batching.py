"""The batch schedule of GRPO training: which prompts each micro-step trains on, and when the
optimizer steps. It follows TRL's GRPOTrainer (TRL 1.x) and keeps its names.

    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2,
                     steps_per_generation=4, num_generations=3)
    print(plan.render(plan.cycles(2)))          # or `grpoflow explain-batches ...`

One generation cycle, as TRL runs it:

  - The generation batch holds effective_batch_size = steps_per_generation x num_processes x
    per_device_train_batch_size completions: unique_prompts = effective_batch_size / num_generations
    new prompts (numbered from 0 across cycles), each repeated num_generations times in a row
    (TRL's RepeatSampler), so a prompt's group is contiguous.
  - Process p takes the p-th contiguous block of per_device_train_batch_size x steps_per_generation
    rows. In TRL the dataloader's batch is a whole per-process generation batch and accelerate deals
    those batches out to the processes in turn. So with 2 processes, process 0 trains on the first
    half of the prompts and process 1 on the second half; a process does NOT get the p-th slice
    of each micro-step. (TRL's own diagram in `_get_train_sampler` still draws the older
    interleaved layout; a 2-process CPU run of TRL's GRPOTrainer gives the block layout.)
  - A process splits its block into steps_per_generation micro-steps of per_device_train_batch_size
    rows, in order. TRL first shuffles the rows within each process's block (`shuffle_sequence_dict`),
    so in TRL a micro-step holds a random per_device_train_batch_size rows of that block; which
    prompts each process gets, and in which cycle, is as shown. grpoflow's trainer does not shuffle.
  - With num_iterations > 1 the same micro-steps are replayed num_iterations times before the next
    generation: micro_steps_per_generation = steps_per_generation x num_iterations.

An optimizer update follows every gradient_accumulation_steps-th micro-step, counted from the start
of training, across cycles (as TRL/accelerate count them). When that does not divide
micro_steps_per_generation, some updates span two generations and optimizer_steps_per_generation
is the fraction micro_steps_per_generation / gradient_accumulation_steps (e.g. 4 / 3 = 1.33...).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from grpoflow.errors import ConfigError

# The GRPO batching guide (Unsloth's advanced RL documentation): unique_prompts = effective_batch_size /
# num_generations "must be > 2". A warning, not an error: a small CPU run may want fewer.
MIN_UNIQUE_PROMPTS = 3
# Dynamic sampling: a refill draws the groups still missing divided by the share kept so far, at most
# this many times the groups missing (grpoflow/train/rollouts.py), so a generate call asks for up to
# this many times a generation's completions.
MAX_REFILL = 8


@dataclass
class MicroStep:
    rows_by_process: list[list[int]]  # [num_processes][per_device_train_batch_size] prompt index per row
    optimizer_update: bool  # the optimizer steps after this micro-step's backward


@dataclass
class Cycle:
    micro_steps: list[MicroStep]  # steps_per_generation x num_iterations


class BatchPlan:
    def __init__(self, per_device_train_batch_size: int, gradient_accumulation_steps: int, num_generations: int,
                 steps_per_generation: int | None = None, generation_batch_size: int | None = None,
                 num_processes: int = 1, num_iterations: int = 1):
        given = {"per_device_train_batch_size": per_device_train_batch_size,
                 "gradient_accumulation_steps": gradient_accumulation_steps, "num_generations": num_generations,
                 "steps_per_generation": steps_per_generation, "generation_batch_size": generation_batch_size,
                 "num_processes": num_processes, "num_iterations": num_iterations}
        for key, value in given.items():
            if value is None and key in ("steps_per_generation", "generation_batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}")
        if num_generations < 2:
            raise ConfigError(
                f"num_generations is {num_generations}: GRPO scores each completion against the others of its "
                f"prompt's group, so it needs at least 2 (TRL's default is 8)")
        if steps_per_generation is not None and generation_batch_size is not None:
            raise ConfigError(
                f"steps_per_generation ({steps_per_generation}) and generation_batch_size ({generation_batch_size}) "
                f"are both set; set one of them (generation_batch_size = steps_per_generation x num_processes "
                f"x per_device_train_batch_size)")

        self.per_device_train_batch_size = per_device_train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.num_generations = num_generations
        self.num_processes = num_processes
        self.num_iterations = num_iterations
        rows_per_micro_step = num_processes * per_device_train_batch_size  # all processes together
        if generation_batch_size is not None:
            if generation_batch_size % rows_per_micro_step:
                raise ConfigError(
                    f"generation_batch_size ({generation_batch_size}) must be a multiple of num_processes x "
                    f"per_device_train_batch_size = {num_processes} x {per_device_train_batch_size} = "
                    f"{rows_per_micro_step}, since every process trains on per_device_train_batch_size rows a "
                    f"micro-step; try {_nearby_multiples(generation_batch_size, rows_per_micro_step)}")
            self.steps_per_generation = generation_batch_size // rows_per_micro_step
        else:
            # TRL: steps_per_generation defaults to gradient_accumulation_steps
            self.steps_per_generation = steps_per_generation or gradient_accumulation_steps
        self._check_whole_groups(steps_per_generation, generation_batch_size)

    @classmethod
    def from_config(cls, grpo: Any, num_processes: int = 1) -> "BatchPlan":
        """From a grpoflow.config.GRPOConfig (or anything with TRL's attribute names)."""
        return cls(per_device_train_batch_size=grpo.per_device_train_batch_size,
                   gradient_accumulation_steps=grpo.gradient_accumulation_steps,
                   num_generations=grpo.num_generations, steps_per_generation=grpo.steps_per_generation,
                   generation_batch_size=grpo.generation_batch_size, num_processes=num_processes,
                   num_iterations=grpo.num_iterations)

    @property
    def effective_batch_size(self) -> int:
        """Completions in one generation batch, all processes together (TRL's generation_batch_size)."""
        return self.steps_per_generation * self.num_processes * self.per_device_train_batch_size

    @property
    def unique_prompts(self) -> int:
        return self.effective_batch_size // self.num_generations

    @property
    def rows_per_process(self) -> int:
        """Completions each process generates and trains on per generation (its block)."""
        return self.per_device_train_batch_size * self.steps_per_generation

    @property
    def global_batch_size(self) -> int:
        """Completions behind one optimizer step, all processes together."""
        return self.gradient_accumulation_steps * self.num_processes * self.per_device_train_batch_size

    def warnings(self) -> list[str]:
        """What the schedule allows but the field's advice warns against, each with the knobs to change."""
        if self.unique_prompts >= MIN_UNIQUE_PROMPTS:
            return []
        E, G, U = self.effective_batch_size, self.num_generations, self.unique_prompts
        P, B = self.num_processes, self.per_device_train_batch_size
        # the smallest steps_per_generation whose batch holds whole groups (a multiple of `step`) of at
        # least MIN_UNIQUE_PROMPTS prompts
        step = G // math.gcd(G, P * B)
        steps = max(self.steps_per_generation, -(-MIN_UNIQUE_PROMPTS * G // (P * B)))
        steps = -(-steps // step) * step
        fewer = [g for g in _divisors(E) or [] if 2 <= g < G and E // g >= MIN_UNIQUE_PROMPTS]
        generations = f", or num_generations to {fewer[-1]} ({E // fewer[-1]} prompts)" if fewer else ""
        return [
            f"unique_prompts = effective_batch_size {E} / num_generations {G} = {U}: the GRPO batching guide says "
            f"it must be > 2. With {_plural(U, 'prompt')} a generation every update follows one or two questions, "
            f"and a group whose completions all score the same (frac_reward_zero_std) leaves a step with nothing "
            f"to learn. To raise it, set steps_per_generation to {steps} (or generation_batch_size to "
            f"{steps * P * B}), or raise per_device_train_batch_size or the number of processes{generations}."]

    def check_groups_stay_on_one_process(self) -> None:
        """grpoflow's trainer generates a prompt's whole group on one process (its own engine) and
        scores it there, so each process's block must hold whole groups. (TRL lets a group straddle
        two processes and gathers the rewards; the schedule above still shows that layout.)"""
        R, G = self.rows_per_process, self.num_generations
        if self.num_processes == 1 or R % G == 0:
            return
        B, S = self.per_device_train_batch_size, self.steps_per_generation
        step_s, step_b = G // math.gcd(G, B), G // math.gcd(G, S)
        raise ConfigError(
            f"on {self.num_processes} processes each process takes a block of per_device_train_batch_size {B} x "
            f"steps_per_generation {S} = {R} completions of every generation, not a whole number of prompt groups "
            f"(num_generations {G}): a group would straddle two processes, and grpoflow generates and scores each "
            f"group on one process. To fix, set per_device_train_batch_size to a multiple of {step_b} "
            f"(e.g. {_nearby_multiples(B, step_b)}), or steps_per_generation to a multiple of {step_s} "
            f"(e.g. {_nearby_multiples(S, step_s)}), or num_generations to a divisor of {R}.")

    @property
    def micro_steps_per_generation(self) -> int:
        return self.steps_per_generation * self.num_iterations

    @property
    def optimizer_steps_per_generation(self) -> int | float:
        """An int when gradient_accumulation_steps divides the micro-steps of a generation, else the
        fraction (updates then span two generations)."""
        steps, rest = divmod(self.micro_steps_per_generation, self.gradient_accumulation_steps)
        return steps if rest == 0 else self.micro_steps_per_generation / self.gradient_accumulation_steps

    def steps_per_epoch(self, num_rows: int) -> int:
        """Optimizer steps in one epoch of num_rows training prompts, counted as TRL (transformers' Trainer
        over TRL's RepeatSampler) counts them: the whole generations the rows fill (a last, partial one is
        left out) times their micro-steps, over gradient_accumulation_steps, rounded up; at least 1."""
        micro_steps = num_rows // self.unique_prompts * self.micro_steps_per_generation
        return max(1, -(-micro_steps // self.gradient_accumulation_steps))

    def max_steps(self, max_steps: int | None, num_train_epochs: float | None, num_rows: int) -> int:
        """The steps a run takes: max_steps, or num_train_epochs' steps (rounded up, as TRL), whichever
        is smaller where both are given."""
        given = [] if max_steps is None else [max_steps]
        if num_train_epochs is not None:
            given.append(math.ceil(num_train_epochs * self.steps_per_epoch(num_rows)))
        return min(given)

    def cycles(self, n: int) -> list[Cycle]:
        """The first n generation cycles of training."""
        B = self.per_device_train_batch_size
        rows_per_process = B * self.steps_per_generation
        cycles = []
        micro_steps_done = 0  # counted from the start of training, across cycles
        for cycle in range(n):
            batch = []  # [effective_batch_size] prompt index of each completion, groups contiguous
            first = cycle * self.unique_prompts
            for prompt in range(first, first + self.unique_prompts):
                batch.extend([prompt] * self.num_generations)
            micro_steps = []
            for _iteration in range(self.num_iterations):
                for s in range(self.steps_per_generation):
                    rows_by_process = []
                    for p in range(self.num_processes):
                        start = p * rows_per_process + s * B  # process p's block, then micro-step s within it
                        rows_by_process.append(batch[start:start + B])
                    micro_steps_done += 1
                    update = micro_steps_done % self.gradient_accumulation_steps == 0
                    micro_steps.append(MicroStep(rows_by_process, update))
            cycles.append(Cycle(micro_steps))
        return cycles

    def to_json(self, cycles: list[Cycle]) -> dict[str, Any]:
        return {
            "effective_batch_size": self.effective_batch_size,
            "unique_prompts": self.unique_prompts,
            "num_processes": self.num_processes,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "rows_per_process": self.rows_per_process,
            "global_batch_size": self.global_batch_size,
            "optimizer_steps_per_generation": self.optimizer_steps_per_generation,
            "cycles": [{"micro_steps": [{"rows_by_process": [list(rows) for rows in m.rows_by_process],
                                         "optimizer_update": m.optimizer_update} for m in c.micro_steps]}
                       for c in cycles],
        }

    def render(self, cycles: list[Cycle]) -> str:
        """The schedule as text: one line per micro-step, `p0 [0,0,0] | p1 [4,4,4]*`, * = optimizer update."""
        P, B, G = self.num_processes, self.per_device_train_batch_size, self.num_generations
        lines = [
            f"generation batch: {self.effective_batch_size} completions = steps_per_generation "
            f"{self.steps_per_generation} x num_processes {P} x per_device_train_batch_size {B}",
            f"  = {_plural(self.unique_prompts, 'prompt')} x num_generations {G}, each prompt's completions in a row",
            f"per generation: {_plural(self.micro_steps_per_generation, 'micro-step')} (steps_per_generation "
            f"{self.steps_per_generation} x num_iterations {self.num_iterations}), "
            f"{_number(self.optimizer_steps_per_generation)} optimizer steps (one every "
            f"gradient_accumulation_steps {self.gradient_accumulation_steps} micro-steps)",
        ]
        lines.append(f"optimizer step: gradient_accumulation_steps {self.gradient_accumulation_steps} x "
                     f"num_processes {P} x per_device_train_batch_size {B} = {self.global_batch_size} completions "
                     f"(the global batch)")
        if P > 1:
            lines.append(f"process p generates and trains on the p-th block of {self.rows_per_process} rows of each "
                         f"generation batch ({_number(self.rows_per_process // G if self.rows_per_process % G == 0 else self.rows_per_process / G)} "
                         f"prompts x {G})")
        if self.micro_steps_per_generation % self.gradient_accumulation_steps:
            lines.append("note: gradient_accumulation_steps does not divide the micro-steps of a generation, "
                         "so some optimizer steps span two generations")
        lines.append("numbers are prompt indices, one per row; * = optimizer step after this micro-step")
        micro, updates = 0, 0
        for c, cycle in enumerate(cycles):
            lines.append(f"generation {c}")
            for i, step in enumerate(cycle.micro_steps):
                parts = []
                for p, rows in enumerate(step.rows_by_process):
                    text = "[" + ",".join(str(r) for r in rows) + "]"
                    parts.append(text if P == 1 else f"p{p} {text}")
                line = f"  micro-step {micro:<3} " + " | ".join(parts)
                if step.optimizer_update:
                    updates += 1
                    line += f"*  optimizer step {updates}"
                if self.num_iterations > 1:
                    line += f"  (iteration {i // self.steps_per_generation + 1} of {self.num_iterations})"
                lines.append(line)
                micro += 1
        return "\n".join(lines) + "\n"

    def _check_whole_groups(self, steps_per_generation: int | None, generation_batch_size: int | None) -> None:
        total, G = self.effective_batch_size, self.num_generations
        if total % G == 0:
            return
        P, B = self.num_processes, self.per_device_train_batch_size
        divisors = [d for d in _divisors(total) or [] if d >= 2]
        closest = sorted(sorted(divisors, key=lambda d: abs(d - G))[:4])
        fix_groups = ""
        if len(closest) == 1:
            fix_groups = f"set num_generations to {closest[0]}"
        elif closest:
            fix_groups = f"set num_generations to one of {', '.join(map(str, closest))}"
        # the smallest steps_per_generation whose batch holds whole groups
        step = G // math.gcd(G, P * B)
        if generation_batch_size is not None:
            fix_batch = (f"set generation_batch_size to a multiple of {step * P * B} "
                         f"(e.g. {_nearby_multiples(total, step * P * B)})")
        else:
            which = "steps_per_generation" if steps_per_generation is not None else \
                "steps_per_generation (it defaults to gradient_accumulation_steps)"
            fix_batch = f"set {which} to a multiple of {step} (e.g. {_nearby_multiples(self.steps_per_generation, step)})"
        fixes = f"{fix_groups}, or {fix_batch}" if fix_groups else fix_batch
        raise ConfigError(
            f"the generation batch is not a whole number of prompt groups: effective_batch_size = "
            f"steps_per_generation {self.steps_per_generation} x num_processes {P} x per_device_train_batch_size "
            f"{B} = {total} completions, not a multiple of num_generations ({G}). To fix, {fixes}.")


def with_max_steps(cfg: Any, plan: BatchPlan, num_rows: int) -> Any:
    """cfg (a PipelineConfig) with grpo.max_steps the steps the run takes, once num_rows (the training
    set's size) is known: num_train_epochs' steps where they are fewer, or where max_steps is null."""
    grpo = cfg.grpo
    if grpo.num_train_epochs is None:
        return cfg
    steps = plan.max_steps(grpo.max_steps, grpo.num_train_epochs, num_rows)
    logging.getLogger("grpoflow.train").info(
        "num_train_epochs %g over %d rows: %d steps (%d an epoch); max_steps %s: training for %d steps",
        grpo.num_train_epochs, num_rows, math.ceil(grpo.num_train_epochs * plan.steps_per_epoch(num_rows)),
        plan.steps_per_epoch(num_rows), grpo.max_steps, steps)
    return cfg.model_copy(update={"grpo": grpo.model_copy(update={"max_steps": steps})})


def _divisors(n: int, max_trials: int = 1_000_000) -> list[int] | None:
    """n's divisors in ascending order, by trial division up to sqrt(n); None when that would take more than
    max_trials divisions (a suggestion is skipped rather than computed for hours)."""
    if math.isqrt(n) > max_trials:
        return None
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _nearby_multiples(value: int, step: int) -> str:
    below = value // step * step
    above = below + step
    return f"{below} or {above}" if below > 0 else str(above)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _number(x: int | float) -> str:
    return str(x) if isinstance(x, int) else f"{x:.2f}"
