"""`length_penalty`: discourage rambling past a length you choose.

    length_penalty(max_chars=2000)                   # -0.001 per character beyond 2000
    length_penalty(max_chars=2000, per_char=0.0005)

Counts characters, not tokens: a reward sees text, and characters do not depend on which
tokenizer the policy uses.
"""

from __future__ import annotations

from grpoflow.rewards.registry import register_factory
from grpoflow.rewards.text import completion_text

FLOOR = -1.0  # one runaway completion must not outweigh every other reward in the sum


@register_factory("length_penalty")
def length_penalty(max_chars: int, per_char: float = 0.001, name: str = "length_penalty"):
    """0.0 up to `max_chars`, then -`per_char` for each character beyond, never below -1.0."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError(f"length_penalty: max_chars must be a whole number >= 0, got {max_chars!r}")
    if isinstance(per_char, bool) or not isinstance(per_char, (int, float)) or per_char <= 0:
        raise ValueError(f"length_penalty: per_char must be a number > 0, got {per_char!r}")

    def score(prompts, completions, **_) -> list[float]:
        excess = [max(0, len(completion_text(c)) - max_chars) for c in completions]
        return [max(FLOOR, -per_char * n) if n else 0.0 for n in excess]

    score.__name__ = name
    return score
