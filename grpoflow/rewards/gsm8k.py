"""The GSM8K reward set people use with GRPO (willcb's gist, the Unsloth notebooks).

The system prompt asks for grpoflow/answer_format.py's layout, <reasoning> then <answer>, and
five rewards score it. Where the gist had bugs, this follows its intent instead:
`correctness` compares numbers after normalisation ('1,000' == '1000' == '$1,000'); `int`
accepts negative numbers; `soft_format` sees across newlines (the gist's pattern lacked
DOTALL, so it almost never fired); `xmlcount` does not penalise the final newline twice.
"""

from __future__ import annotations

from grpoflow.answer_format import (ANSWER_CLOSE, ANSWER_OPEN, REASONING_CLOSE, REASONING_OPEN, SOFT_FORMAT,
                                   STRICT_FORMAT)
from grpoflow.rewards.registry import register
from grpoflow.rewards.text import completion_text, extract_answer, parse_number

# The strict layout's first and last lines, and each tag in the newline form it has there.
_STRICT_START, _STRICT_END = f"{REASONING_OPEN}\n", f"\n{ANSWER_CLOSE}\n"
_TAG_LINES = (f"{REASONING_OPEN}\n", f"\n{REASONING_CLOSE}\n", f"\n{ANSWER_OPEN}\n", f"\n{ANSWER_CLOSE}")


@register("correctness")
def correctness(prompts, completions, answer, **_) -> list[float | None]:
    """+2.0 when the last <answer> equals the gold `answer` column; numbers compared normalised."""
    return [_correct(extract_answer(completion_text(c)), gold) for c, gold in zip(completions, answer)]


def _correct(extracted: str | None, gold) -> float | None:
    if gold is None:
        return None
    if extracted is None:
        return 0.0
    gold = str(gold).strip()
    number, gold_number = parse_number(extracted), parse_number(gold)
    if number is not None and gold_number is not None:
        return 2.0 if number == gold_number else 0.0
    return 2.0 if extracted == gold else 0.0


@register("int")
def int_reward(prompts, completions, **_) -> list[float]:
    """+0.5 when the last <answer> is a whole number ('72', '-3', '1,000', '$18', '7.0')."""
    rewards = []
    for c in completions:
        number = parse_number(extract_answer(completion_text(c)))
        rewards.append(0.5 if number is not None and "." not in number else 0.0)
    return rewards


@register("strict_format")
def strict_format(prompts, completions, **_) -> list[float]:
    """+0.5 when the completion is exactly the system prompt's format, newlines included."""
    return [0.5 if _is_strict(completion_text(c)) else 0.0 for c in completions]


def _is_strict(text: str) -> bool:
    # Checked first so the regex never backtracks through a long text that cannot match.
    if not (text.startswith(_STRICT_START) and text.endswith(_STRICT_END)):
        return False
    return STRICT_FORMAT.fullmatch(text) is not None


@register("soft_format")
def soft_format(prompts, completions, **_) -> list[float]:
    """+0.5 for <reasoning>...</reasoning> then <answer>...</answer> anywhere, any whitespace."""
    return [0.5 if _is_soft(completion_text(c)) else 0.0 for c in completions]


def _is_soft(text: str) -> bool:
    # Search from the first <reasoning> up to the last </answer> only: that keeps the lazy
    # `.*?` from rescanning to the end once per candidate tag, quadratic on a 1 MB completion.
    start, end = text.find(REASONING_OPEN), text.rfind(ANSWER_CLOSE)
    if start < 0 or end < start:
        return False
    return SOFT_FORMAT.match(text, start, end + len(ANSWER_CLOSE)) is not None


@register("xmlcount")
def xmlcount(prompts, completions, **_) -> list[float]:
    """Up to +0.5: +0.125 per tag found exactly once in its newline form, minus 0.001 per
    character after </answer> (past the one newline the format ends with). The penalty has no
    floor, as in the gist; completions are bounded by max_completion_length."""
    return [_count_xml(completion_text(c)) for c in completions]


def _count_xml(text: str) -> float:
    score = 0.0
    for tag in _TAG_LINES:
        if text.count(tag) == 1:
            score += 0.125
    end = text.rfind(ANSWER_CLOSE)
    if end >= 0:
        tail = text[end + len(ANSWER_CLOSE):]
        tail = tail[1:] if tail.startswith("\n") else tail
        score -= 0.001 * len(tail)
    return score
