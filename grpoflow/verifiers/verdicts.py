"""Is a completion's final answer right? The verdicts the evaluation stage reports.

Two readings of the same completion:
- `answer_correct`: the last <answer>...</answer> equals the gold answer: the format the
  system prompt asks for, and what the `correctness` reward pays for;
- `last_number_correct`: the last number anywhere in the text equals the gold answer: the
  lenient reading common in GSM8K reports, which shows what a model knows before it has
  learnt the format.
"""

from __future__ import annotations

import re

from grpoflow.rewards import load_reward
from grpoflow.rewards.text import completion_text, extract_answer, parse_number

_NUMBERS = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_TAIL_CHARS = 2000  # the last number is near the end; a 1 MB completion is not scanned whole


def answer_correct(completion, gold: str | None, answer_type: str = "number") -> bool | None:
    """None when there is no gold answer to compare with."""
    if not gold:
        return None
    extracted = extract_answer(completion_text(completion))
    if extracted is None:
        return False
    if answer_type == "number":
        number = parse_number(extracted)
        return number is not None and number == parse_number(gold)
    return _plain(extracted) == _plain(gold)


def last_number_correct(completion, gold: str | None) -> bool | None:
    if not gold:
        return None
    gold_number = parse_number(gold)
    numbers = _NUMBERS.findall(completion_text(completion)[-_TAIL_CHARS:])
    return gold_number is not None and bool(numbers) and parse_number(numbers[-1]) == gold_number


def in_format(completions: list, *, strict: bool) -> list[bool]:
    """Whether each completion has the <reasoning>/<answer> layout: exactly what strict_format pays
    for, or loosely what soft_format does (one definition: the rewards')."""
    name = "strict_format" if strict else "soft_format"
    values = load_reward(name).fn(prompts=[None] * len(completions), completions=completions)
    return [v is not None and v > 0 for v in values]


def _plain(text: str) -> str:
    return " ".join(text.casefold().split())
