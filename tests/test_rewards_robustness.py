"""Bad completions never crash a built-in reward, and never make one slow."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from grpoflow.rewards import load_reward

RUBRIC = Path(__file__).resolve().parents[1] / "configs" / "rubrics" / "email.yaml"
BUILT_INS = [
    "correctness", "int", "strict_format", "soft_format", "xmlcount", "math_equivalence", "proximity",
    "regex(pattern='(?s)<answer>.*</answer>')", "length_penalty(max_chars=1000)", f"rubric(path='{RUBRIC}')",
]
MEGABYTE = 1_000_000
BAD_COMPLETIONS = {
    "empty": "",
    "whitespace": " \n\t ",
    "one megabyte": "x" * MEGABYTE,
    "one megabyte inside answer tags": "<answer>" + "9" * MEGABYTE + "</answer>",
    "lone surrogate": "<answer>\udcff</answer>",
    "surrogate around a number": "<reasoning>\n\ud800\n</reasoning>\n<answer>\n72\udcff\n</answer>\n",
    "invalid utf-8 bytes": b"<answer>\xff\xfe</answer>",
    "missing tags": "The answer is 72.",
    "only an opening tag": "<reasoning>\n<answer>",
    "nested tags": "<answer><answer>72</answer></answer>",
    "null byte": "<answer>7\x002</answer>",
    "conversation": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<answer>72</answer>"}],
    "conversation without assistant": [{"role": "user", "content": "q"}],
    "empty conversation": [],
    "content parts": [{"role": "assistant", "content": [{"type": "text", "text": "<answer>72</answer>"}]}],
    "content None": [{"role": "assistant", "content": None}],
}


@pytest.mark.parametrize("spec", BUILT_INS)
def test_bad_completions_get_a_score(spec):
    reward = load_reward(spec)
    completions = list(BAD_COMPLETIONS.values())
    n = len(completions)
    values = reward.fn(prompts=["p"] * n, completions=completions, answer=["72"] * n, recipient=["Ana"] * n,
                       keyword=["report"] * n, reference=["Dear Ana"] * n)
    assert len(values) == n
    assert all(v is None or isinstance(v, float) for v in values), values


TAG_SPAM = {  # worst cases for backtracking regexes: many openings, no closing
    "reasoning openings": "<reasoning>" * (MEGABYTE // 11),
    "reasoning openings, one answer close": "<reasoning>" * (MEGABYTE // 11) + "</answer>",
    "reasoning pairs, no answer close": ("<reasoning>\n</reasoning>\n<answer>\n" * (MEGABYTE // 34)),
    "answer openings": "<answer>" * (MEGABYTE // 8),
    "strict prefix and suffix, spam between": "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * 40_000 + "\n</answer>\n",
}


@pytest.mark.parametrize("spec", ["correctness", "int", "strict_format", "soft_format", "xmlcount", "proximity"])
def test_tag_spam_stays_linear(spec):
    # Quadratic matching on these would take minutes; linear takes milliseconds. The bound
    # is loose on purpose: this catches the blow-up, it is not a benchmark.
    reward = load_reward(spec)
    start = time.perf_counter()
    reward.fn(prompts=["p"] * len(TAG_SPAM), completions=list(TAG_SPAM.values()), answer=["72"] * len(TAG_SPAM))
    assert time.perf_counter() - start < 5.0
