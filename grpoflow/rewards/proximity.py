"""`proximity`: partial credit for numeric answers that are close, a penalty for far-off ones.

Exact-match rewards give no gradient between "off by one" and "off by a million"; early in
training, when almost nothing is exactly right, this one does. Pair it with `correctness`.
"""

from __future__ import annotations

from grpoflow.rewards.registry import register_factory
from grpoflow.rewards.text import completion_text, extract_answer, parse_number


@register_factory("proximity")
def proximity(zero_at: float = 0.5, name: str = "proximity"):
    """1.0 for the exact number, falling linearly with the relative error |x - gold| / |gold|:
    0.0 at `zero_at`, negative beyond, down to -1.0 at twice `zero_at` and for answers that are
    not a number. None when the gold answer is not a number. For a gold answer of 0 the error
    is taken relative to 1.

        proximity                    # zero_at=0.5: 90 for a gold 100 scores 0.8, 200 scores -1.0
        proximity(zero_at=0.1)       # stricter
    """
    if isinstance(zero_at, bool) or not isinstance(zero_at, (int, float)) or zero_at <= 0:
        raise ValueError(f"proximity: zero_at must be a number > 0, got {zero_at!r}")

    def reward(prompts, completions, answer, **_) -> list[float | None]:
        rewards = []
        for completion, gold in zip(completions, answer):
            gold_number = parse_number(None if gold is None else str(gold))
            if gold_number is None:
                rewards.append(None)
                continue
            number = parse_number(extract_answer(completion_text(completion)))
            if number is None:
                rewards.append(-1.0)
                continue
            target = float(gold_number)
            relative_error = abs(float(number) - target) / (abs(target) or 1.0)
            rewards.append(max(-1.0, 1.0 - relative_error / zero_at))
        return rewards

    reward.__name__ = name
    return reward
