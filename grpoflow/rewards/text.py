"""From a completion to the text and the final answer that rewards look at.

Every built-in reward goes through these helpers, so that they agree on what "the answer"
is and none of them has to guard against odd input on its own. All of them run in time
linear in the completion's length: a 1 MB completion full of tags must not stall a batch.
"""

from __future__ import annotations

import re
from typing import Any

from grpoflow.answer_format import ANSWER_CLOSE, ANSWER_OPEN
from grpoflow.normalize import normalize_number

# '18 dollars', '18 apples.', '30 %': one number followed by at most three unit words.
_NUMBER_WITH_UNITS = re.compile(r"(\$?\s*-?[\d,]*\.?\d+)\s*(?:%|[^\W\d_]+\.?)(?:\s+[^\W\d_]+\.?){0,2}")


def completion_text(completion: Any) -> str:
    """The text of one completion, whatever form the trainer handed it in.

    TRL passes plain strings for standard datasets and lists of {role, content} messages for
    conversational ones; there the completion is the last assistant message. Lone surrogates
    (from a tokenizer decoding half a character) are replaced, so later encoding, logging and
    the math-verify process never trip on them.
    """
    if completion is None:
        return ""
    if isinstance(completion, bytes):
        return completion.decode("utf-8", errors="replace")
    if isinstance(completion, dict):  # a single message
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        assistant = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        if assistant:
            return _content_text(assistant[-1].get("content"))
        messages = [m for m in completion if isinstance(m, dict)]
        return _content_text(messages[-1].get("content")) if messages else ""
    if not isinstance(completion, str):
        raise TypeError(
            f"a completion must be a string or a list of {{role, content}} messages, "
            f"got {type(completion).__name__}"
        )
    return completion.encode("utf-8", errors="replace").decode("utf-8")


def _content_text(content: Any) -> str:
    # Multimodal chat messages carry a list of parts: [{"type": "text", "text": ...}, ...].
    if isinstance(content, list):
        return "".join(completion_text(p.get("text")) for p in content if isinstance(p, dict))
    return completion_text(content)


def extract_answer(text: str) -> str | None:
    """The content of the last closed <answer>...</answer> pair, stripped; None without one.

    With two answers ('<answer>3</answer> ... <answer>4</answer>') the last wins, as in most
    graders: a model that corrects itself is graded on its correction. An <answer> left open
    (a truncated completion) gives None: there is no answer to grade.
    """
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


def parse_number(answer: str | None) -> str | None:
    """A final answer as a normalised number string, or None when it is not one number.

    Beyond normalize_number ('1,080' -> '1080', '$18.50' -> '18.5') this drops trailing unit
    words ('18 dollars' -> '18', '30%' -> '30') and reads the Unicode minus sign, which
    models print after reading typeset math.
    """
    if answer is None:
        return None
    answer = answer.strip().replace("\u2212", "-")
    if len(answer) > 100:  # no single number is written this long; skip the regex work
        return None
    number = normalize_number(answer)
    if number is None and (m := _NUMBER_WITH_UNITS.fullmatch(answer)):
        number = normalize_number(m.group(1))
    return number
