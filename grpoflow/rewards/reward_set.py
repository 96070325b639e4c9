"""Score a batch of completions with several rewards and combine them, as TRL's GRPO does.

    rewards = RewardSet(["correctness", "xmlcount", "my_rewards.py:judge"], reward_weights=[1, 1, 0.5])
    scores = rewards.score(prompts, completions, answer=answers)   # column kwargs: one value per completion
    scores.totals                      # [B] weighted sum over the rewards that apply
    scores.metrics(num_generations=8)  # rewards/<name>/mean, .../std, .../errors, reward, reward_std, ...

Rules:
- A reward returns one float or None per completion; None means "does not apply" and is left
  out of that completion's total and of the reward's mean. A completion no reward applies to
  totals 0.0, as TRL's nansum gives: GRPO needs a number for every completion.
- Async rewards (`async def`) run concurrently with each other and with the sync ones. Sync
  rewards run in the caller's thread, one after another.
- A reward that raises does not stop scoring. If it fails on the whole batch it is called again
  one completion at a time, so one bad completion costs only its own score: those that still
  fail get None, are counted in `rewards/<name>/errors`, and each distinct error is logged once
  (logger "grpoflow.rewards") with its traceback.
  A UserError (grpoflow/errors.py) is the exception: a setting no retry fixes, such as the code
  sandbox finding no isolation on this machine, stops the run with its message.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from grpoflow.errors import UserError
from grpoflow.rewards.background_loop import submit
from grpoflow.rewards.loader import NamedReward, RewardSpecError, load_reward

log = logging.getLogger("grpoflow.rewards")


@dataclass
class Scores:
    per_reward: dict[str, list[float | None]]  # name -> [B], in reward_funcs order
    totals: list[float]  # [B]
    errors: dict[str, int]  # name -> completions whose score was lost to an exception

    def metrics(self, num_generations: int) -> dict[str, float]:
        """TRL's reward metrics for this batch.

        `reward_std` is the mean over prompt groups (consecutive runs of `num_generations`
        completions) of each group's std, as TRL logs it with scale_rewards group or none; pass
        num_generations=len(totals) for the batch-wide std it logs with scale_rewards=batch.
        A reward that applied to no completion has mean and std NaN.
        """
        n = len(self.totals)
        if n == 0:
            raise ValueError("no completions were scored; there is nothing to report")
        if num_generations < 1 or n % num_generations:
            raise ValueError(f"num_generations={num_generations} does not divide the batch of {n} completions")
        out: dict[str, float] = {}
        for name, values in self.per_reward.items():
            applied = [v for v in values if v is not None]
            out[f"rewards/{name}/mean"] = statistics.fmean(applied) if applied else math.nan
            out[f"rewards/{name}/std"] = _std(applied) if applied else math.nan
            out[f"rewards/{name}/errors"] = float(self.errors[name])
        groups = [self.totals[i:i + num_generations] for i in range(0, n, num_generations)]
        group_stds = [_std(g) for g in groups]
        out["reward"] = statistics.fmean(self.totals)
        out["reward_std"] = statistics.fmean(group_stds)
        out["frac_reward_zero_std"] = statistics.fmean(float(s <= 1e-8) for s in group_stds)
        return out


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0  # unbiased, like torch.std


class RewardSet:
    def __init__(self, reward_funcs: list[str | Callable], reward_weights: list[float] | None = None):
        if not reward_funcs:
            raise RewardSpecError("reward_funcs is empty; name at least one reward, e.g. ['correctness']")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise RewardSpecError(
                f"reward_weights has {len(reward_weights)} values but reward_funcs has "
                f"{len(reward_funcs)}; give one weight per reward function"
            )
        self.rewards: list[NamedReward] = [load_reward(spec) for spec in reward_funcs]
        self.weights = [float(w) for w in reward_weights] if reward_weights is not None else [1.0] * len(self.rewards)
        seen: dict[str, str] = {}
        for reward in self.rewards:
            if reward.name in seen:
                raise RewardSpecError(
                    f"two rewards are named '{reward.name}' ({seen[reward.name]!r} and {reward.spec!r}), "
                    f"so their metrics would collide; give one a name, e.g. regex(pattern='...', name='greeting')"
                )
            seen[reward.name] = reward.spec
        self._logged: set[tuple[str, str, str]] = set()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def score(self, prompts: list, completions: list, **columns: Any) -> Scores:
        """Score each completion with every reward. Column kwargs that are lists must hold one
        value per completion; other values (a trainer state) are passed to every call as is."""
        n = len(completions)
        for key, value in [("prompts", prompts), *columns.items()]:
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ValueError(f"'{key}' has {len(value)} values for {n} completions; give one per completion")
        batch = _Batch(prompts, completions, columns)
        pending = {r.name: submit(self._score_async(r, batch)) for r in self.rewards if _is_async(r.fn)}
        results = {r.name: self._score_sync(r, batch) for r in self.rewards if r.name not in pending}
        results.update({name: future.result() for name, future in pending.items()})

        per_reward = {name: results[name][0] for name in self.names}
        errors = {name: results[name][1] for name in self.names}
        totals = []
        for i in range(n):
            applied = [(w, per_reward[name][i]) for w, name in zip(self.weights, self.names)]
            totals.append(sum((w * v for w, v in applied if v is not None), 0.0))
        return Scores(per_reward, totals, errors)

    def _score_sync(self, reward: NamedReward, batch: _Batch) -> tuple[list[float | None], int]:
        try:
            return _accept(reward, reward.fn(**batch.kwargs()), batch.size), 0
        except UserError:
            raise
        except Exception as e:
            self._log_once(reward, e, batch.size)
        if batch.size == 1:
            return [None], 1
        values, failed = [], 0
        for i in range(batch.size):
            try:
                values += _accept(reward, reward.fn(**batch.kwargs(i)), 1)
            except UserError:
                raise
            except Exception as e:
                self._log_once(reward, e, 1)
                values.append(None)
                failed += 1
        return values, failed

    async def _score_async(self, reward: NamedReward, batch: _Batch) -> tuple[list[float | None], int]:
        # Mirrors _score_sync; the retries of one completion at a time run concurrently.
        try:
            return _accept(reward, await reward.fn(**batch.kwargs()), batch.size), 0
        except UserError:
            raise
        except Exception as e:
            self._log_once(reward, e, batch.size)
        if batch.size == 1:
            return [None], 1

        async def one(i: int) -> tuple[float | None, int]:
            try:
                return _accept(reward, await reward.fn(**batch.kwargs(i)), 1)[0], 0
            except UserError:
                raise
            except Exception as e:
                self._log_once(reward, e, 1)
                return None, 1

        outcomes = await asyncio.gather(*(one(i) for i in range(batch.size)))
        return [value for value, _ in outcomes], sum(failed for _, failed in outcomes)

    def _log_once(self, reward: NamedReward, error: Exception, size: int) -> None:
        key = (reward.name, type(error).__name__, str(error)[:500])
        if key in self._logged:
            return
        self._logged.add(key)
        then = ("retrying one completion at a time" if size > 1
                else f"that completion scores None, counted in rewards/{reward.name}/errors")
        log.warning("reward '%s' raised %s: %s; %s (each distinct error is logged once)",
                    reward.name, type(error).__name__, error, then, exc_info=error)


class _Batch:
    def __init__(self, prompts: list, completions: list, columns: dict[str, Any]):
        self.prompts, self.completions, self.columns = prompts, completions, columns
        self.size = len(completions)

    def kwargs(self, i: int | None = None) -> dict[str, Any]:
        """All completions, or only completion i (each per-completion list cut to one value)."""
        if i is None:
            return {"prompts": self.prompts, "completions": self.completions, **self.columns}
        one = {k: v[i:i + 1] if isinstance(v, (list, tuple)) else v for k, v in self.columns.items()}
        prompts = self.prompts[i:i + 1] if isinstance(self.prompts, (list, tuple)) else self.prompts
        return {"prompts": prompts, "completions": self.completions[i:i + 1], **one}


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _accept(reward: NamedReward, values: Any, n: int) -> list[float | None]:
    """Check a reward's return value: n floats or None (NaN, TRL's "None", is read as None)."""
    if inspect.iscoroutine(values):
        values.close()
        raise TypeError(f"reward '{reward.name}' returned a coroutine; declare it with `async def`")
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"reward '{reward.name}' returned {type(values).__name__}; expected a list of {n} floats or None")
    if len(values) != n:
        raise ValueError(f"reward '{reward.name}' returned {len(values)} values for {n} completions")
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
            raise TypeError(f"reward '{reward.name}' returned {v!r}; expected a float or None per completion")
        out.append(None if math.isnan(float(v)) else float(v))
    return out
