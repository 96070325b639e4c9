"""Evaluation during training (grpo.eval_strategy: steps) and the best checkpoint it picks.

    evaluator = PeriodicEval(cfg, heldout_path, dist)   # the first grpo.eval_prompts held-out rows with an answer
    if evaluator.due(step):
        metrics = evaluator.evaluate(policy, engine, step)   # every process; eval_accuracy, eval_accuracy_ci95 ...
    evaluator.keep_if_best(state)                        # at a checkpoint: is its step the best so far?

The policy answers greedily through the rollout engine the trainer already has, used as a
generation uses it: handed the policy's weights first (vLLM: sync_weights), put to sleep after
(vLLM releases its KV cache). The completions are verified and scored by
grpoflow.evaluation.score_greedy, the evaluation stage's own code, with eval.reward_funcs. Only the
length differs from the stage: up to grpo.max_completion_length new tokens after a prompt cut to
grpo.max_prompt_length, what the engine was sized for (the stage takes eval.max_new_tokens).

The best checkpoint follows transformers: a checkpoint is a candidate when its step was evaluated
(grpo.save_steps is a multiple of eval_steps; the last step is always both), it is the best when
its metric_for_best_model beats every earlier candidate's (a tie keeps the earlier one), and
save_total_limit's pruning spares it. TrainState keeps best_metric and best_global_step, so a
resumed run goes on comparing against the best so far.

Under torchrun every process answers its block of the slice, the blocks padded to one size so that
every process makes the same generate calls (under FSDP2 each call gathers the weights, a
collective); rank 0 scores all the completions and every process receives its figures, so every
process takes the same decision on the best checkpoint. The RNGs are put back afterwards: an
evaluation changes nothing in the training run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from grpoflow.config import PipelineConfig
from grpoflow.environments import make_environment
from grpoflow.errors import ConfigError
from grpoflow.evaluation import score_greedy
from grpoflow.rewards import RewardSet
from grpoflow.rollout import RolloutEngine, SamplingParams
from grpoflow.rollout.episodes import run_episodes
from grpoflow.train.checkpoint import TrainState, rng_state, set_rng_state
from grpoflow.train.distributed import Distributed

log = logging.getLogger("grpoflow.train")


class PeriodicEval:
    def __init__(self, cfg: PipelineConfig, heldout_path: Path, dist: Distributed):
        grpo = self.grpo = cfg.grpo
        self.dist, self.answer_type = dist, cfg.data.answer_type
        self.every = grpo.eval_steps or grpo.logging_steps
        rows = pq.read_table(heldout_path).to_pylist()
        self.rows = [r for r in rows if (r.get("answer") or "").strip()][: grpo.eval_prompts]
        if not self.rows:
            raise ConfigError(f"grpo.eval_strategy is 'steps', but none of the {len(rows)} held-out rows in "
                              f"{heldout_path} has a gold answer to score against; set grpo.eval_strategy: no")
        self.rewards = RewardSet(cfg.eval.reward_funcs)
        self.env, self.max_turns = make_environment(cfg.rollout), cfg.rollout.max_turns
        self.params = SamplingParams(max_tokens=grpo.max_completion_length, temperature=0.0,
                                     truncate_prompt_tokens=grpo.max_prompt_length)
        self.last: dict[str, Any] | None = None  # the latest evaluation's metrics, with its step

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.grpo.max_steps

    def evaluate(self, policy, engine: RolloutEngine, step: int) -> dict[str, Any]:
        """The held-out figures of the policy as it is now, `eval_`-prefixed. Every process calls it."""
        dist = self.dist
        started = time.perf_counter()
        block = math.ceil(len(self.rows) / dist.world_size)
        mine = self.rows[dist.rank * block:(dist.rank + 1) * block]
        padded = mine + [self.rows[0]] * (block - len(mine))
        rng = rng_state()
        engine.sync_weights(policy, step)  # vLLM: answer with the policy as it is now
        # the environment the policy trains in (rollout.environment): with its tool, if it has one
        greedy = [group[0] for group in run_episodes(engine, self.env, padded, self.params,
                                                     max_turns=self.max_turns)][:len(mine)]
        engine.sleep()  # vLLM: the KV cache is released while the trainer works
        set_rng_state(rng)
        everyone = [c for part in dist.all_gather(greedy) for c in part]  # [len(rows)], in row order
        metrics = None
        if dist.is_main:
            figures, _ = score_greedy(self.rows, everyone, self.rewards, self.answer_type)
            metrics = eval_metrics(figures, seconds=time.perf_counter() - started)
            log.info("step %d: held-out accuracy %.1f%% [%.1f, %.1f], strict format %.1f%%, reward %.3f on %d",
                     step, 100 * figures["accuracy"], *(100 * x for x in figures["accuracy_ci95"]),
                     100 * figures["format_strict"], figures["reward"], figures["scored"])
        metrics = dist.all_gather(metrics)[0]  # rank 0's, on every process
        self.last = {"step": step, **metrics}
        return metrics

    def keep_if_best(self, state: TrainState) -> bool:
        """At the checkpoint of state.step: when that step was evaluated and beats the best so far,
        it becomes the best (state.best_metric, state.best_global_step). Every process calls it."""
        metric = self.grpo.metric_for_best_model
        if metric is None or self.last is None or self.last["step"] != state.step:
            return False
        value = self.last[f"eval_{metric}"]
        best = state.best_metric
        if best is not None and not (value > best if self.grpo.greater_is_better else value < best):
            return False
        state.best_metric, state.best_global_step = value, state.step
        return True


def eval_metrics(figures: dict[str, Any], *, seconds: float) -> dict[str, Any]:
    """score_greedy's figures as one flat metrics.jsonl record: eval_accuracy, eval_accuracy_ci95
    ([low, high]), eval_format_strict, eval_reward, eval_rewards/<name> ..."""
    flat = {k: v for k, v in figures.items() if k not in ("rewards", "reward_errors")}
    flat.update({f"rewards/{name}": v for name, v in figures["rewards"].items()})
    flat.update({f"rewards/{name}/errors": n for name, n in figures["reward_errors"].items() if n})
    flat["seconds"] = round(seconds, 2)
    return {f"eval_{k}": list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def plot_eval(records: list[dict[str, Any]], path: Path, *, best_step: int | None = None) -> Path:
    """eval.png: held-out accuracy with its 95% interval, format and reward against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("accuracy", "accuracy"), ("accuracy_last_number", "accuracy (last number)")):
        line, = ax.plot(steps, [r[f"eval_{key}"] for r in records], marker="o", lw=2, label=label)
        ax.fill_between(steps, [r[f"eval_{key}_ci95"][0] for r in records],
                        [r[f"eval_{key}_ci95"][1] for r in records], color=line.get_color(), alpha=0.15)
    ax.plot(steps, [r["eval_format_strict"] for r in records], marker=".", lw=1, label="strict format")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"held-out, greedy ({records[-1]['eval_scored']} questions; bands: 95% intervals)")
    ax2.plot(steps, [r["eval_reward"] for r in records], marker="o", lw=2, color="tab:green", label="reward")
    ax2.set_title("held-out reward")
    for a in (ax, ax2):
        if best_step is not None:
            a.axvline(best_step, color="grey", ls="--", lw=1, label=f"best checkpoint (step {best_step})")
        a.set_xlabel("step")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
