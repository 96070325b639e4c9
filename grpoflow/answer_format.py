"""The answer format the models are taught, said once: the tags, the layout, and its patterns.

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

The default system prompt asks for it, the format warm-up writes it, and the rewards and the
evaluation check it, all from the names below, so that what is asked, taught and paid for stay
one and the same.
"""

from __future__ import annotations

import re

REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def format_answer(reasoning: str, answer: str) -> str:
    """The layout exactly, final newline included: what strict_format pays for."""
    return f"{REASONING_OPEN}\n{reasoning}\n{REASONING_CLOSE}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}\n"


SYSTEM_PROMPT = "Respond in the following format:\n" + format_answer("...", "...").removesuffix("\n")

_R_OPEN, _R_CLOSE, _A_OPEN, _A_CLOSE = map(re.escape, (REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE))
# format_answer's layout with anything for the reasoning and the answer: use with fullmatch.
STRICT_FORMAT = re.compile(rf"{_R_OPEN}\n.*?\n{_R_CLOSE}\n{_A_OPEN}\n.*?\n{_A_CLOSE}\n", re.DOTALL)
# The tags in order, any whitespace between the two blocks, anything around them.
SOFT_FORMAT = re.compile(rf"{_R_OPEN}.*?{_R_CLOSE}\s*{_A_OPEN}.*?{_A_CLOSE}", re.DOTALL)
