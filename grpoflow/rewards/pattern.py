"""`regex`: a fixed reward when the completion matches a pattern you give in the config.

    regex(pattern="(?m)^Best regards,$", reward=0.5, name="signoff")

Uses re.search, so the pattern may match anywhere; anchor it with ^ and $ (and (?m) for
lines, (?s) to let . cross newlines) where it must not.
"""

from __future__ import annotations

import re

from grpoflow.rewards.registry import register_factory
from grpoflow.rewards.text import completion_text


@register_factory("regex")
def regex_reward(pattern: str, reward: float = 1.0, name: str = "regex"):
    """`reward` when `pattern` is found in the completion, else 0.0."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex: pattern must be a string, got {pattern!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regex: invalid pattern {pattern!r}: {e}") from None
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise ValueError(f"regex: reward must be a number, got {reward!r}")

    def score(prompts, completions, **_) -> list[float]:
        return [float(reward) if compiled.search(completion_text(c)) else 0.0 for c in completions]

    score.__name__ = name
    return score
