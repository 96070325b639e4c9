"""The held-out figures of greedy completions: what the evaluation stage reports for a model and
what evaluation during training logs, from one function.

    figures, table = score_greedy(rows, completions, RewardSet(eval.reward_funcs), answer_type)

figures: accuracy (`<answer>` against the gold answer) and accuracy on the last number, each with
its 95% Wilson interval; the strict and soft format rates; the mean completion length and the share
cut at the token limit; the reward (sum of eval.reward_funcs) and each reward's mean. table: the
same per sample, a column each. Episodes of a multi-turn environment (rollout.environment:
python_tool) are judged on the model's last turn (completion.final_text), and add the
mean of each of the environment's counts (tool_calls, tool_errors), the share of rows whose
episode called the tool and the mean number of the model's turns; the rewards get the counts as
columns, as in training.
"""

from __future__ import annotations

import math
from typing import Any

from grpoflow.rewards import RewardSet, extract_answer
from grpoflow.rollout import Completion
from grpoflow.verifiers.verdicts import answer_correct, in_format, last_number_correct


def score_greedy(rows: list[dict[str, Any]], greedy: list[Completion], rewards: RewardSet,
                 answer_type: str) -> tuple[dict[str, Any], dict[str, list]]:
    """rows: held-out rows with a gold answer; greedy: one completion per row, in row order."""
    texts = [c.final_text for c in greedy]  # the answer: the model's last turn of an episode
    golds = [r["answer"] for r in rows]
    correct = [bool(answer_correct(t, g, answer_type)) for t, g in zip(texts, golds)]
    lenient = [bool(last_number_correct(t, g)) for t, g in zip(texts, golds)]
    strict = in_format(texts, strict=True)
    soft = in_format(texts, strict=False)
    columns = {k: [r.get(k) for r in rows] for k in ("answer", "question", "metadata")}
    counts = list(dict.fromkeys(k for c in greedy for k in c.parts))  # the environment's, none for single_turn
    columns.update({k: [c.parts.get(k, 0) for c in greedy] for k in counts})
    if counts:
        columns["conversation"] = [c.text for c in greedy]
    scores = rewards.score([r["prompt"] for r in rows], texts, **columns)
    lengths = [len(c.token_ids) for c in greedy]

    figures: dict[str, Any] = {
        "scored": len(rows),
        "accuracy": _mean(correct), "accuracy_ci95": wilson_interval(sum(correct), len(correct)),
        "accuracy_last_number": _mean(lenient),
        "accuracy_last_number_ci95": wilson_interval(sum(lenient), len(lenient)),
        "format_strict": _mean(strict), "format_strict_ci95": wilson_interval(sum(strict), len(strict)),
        "format_soft": _mean(soft), "format_soft_ci95": wilson_interval(sum(soft), len(soft)),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "truncated": _mean([not c.finished for c in greedy]),
        "rewards": {name: _mean_of(values) for name, values in scores.per_reward.items()},
        "reward": sum(scores.totals) / len(scores.totals),
        "reward_errors": scores.errors,
    }
    if counts:
        figures["mean_turns"] = sum(c.turns for c in greedy) / len(greedy)
        figures.update({k: sum(columns[k]) / len(greedy) for k in counts})
        if "tool_calls" in counts:
            called = [calls > 0 for calls in columns["tool_calls"]]
            figures["tool_call_rate"] = _mean(called)
            figures["tool_call_rate_ci95"] = wilson_interval(sum(called), len(called))
    table = {"id": [r["id"] for r in rows], "question": [r["question"] for r in rows], "answer": golds,
             "completion": [c.text for c in greedy], "extracted": [extract_answer(t) for t in texts],
             "completion_tokens": lengths, "finished": [c.finished for c in greedy],
             "correct": correct, "correct_last_number": lenient, "format_strict": strict, "reward": scores.totals}
    for name, values in scores.per_reward.items():
        table[f"rewards/{name}"] = values
    table.update({k: columns[k] for k in counts})  # the environment's counts per row
    return figures, table


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval: honest at 0% and 100%, where the normal one collapses."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _mean_of(values: list[float | None]) -> float | None:
    applied = [v for v in values if v is not None]
    return sum(applied) / len(applied) if applied else None
