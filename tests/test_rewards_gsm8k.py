"""The GSM8K reward set (correctness, int, strict_format, soft_format, xmlcount) and the
helpers that pull the answer out of a completion."""

from __future__ import annotations

import pytest

from grpoflow.rewards import completion_text, extract_answer, parse_number
from grpoflow.rewards.gsm8k import correctness, int_reward, soft_format, strict_format, xmlcount

STRICT = "<reasoning>\n9 * 8 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"


def score(reward, completion, answer="72"):
    return reward(prompts=["p"], completions=[completion], answer=[answer])[0]


def tagged(answer: str) -> str:
    return f"<reasoning>\nwork\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


@pytest.mark.parametrize("model_answer, gold, expected", [
    ("72", "72", 2.0),
    ("73", "72", 0.0),
    ("1,000", "1000", 2.0),
    ("1000", "1,000", 2.0),
    ("$18", "18", 2.0),
    ("$18.00", "18", 2.0),
    ("18 dollars", "18", 2.0),
    ("18 dollars.", "18", 2.0),
    ("30%", "30", 2.0),
    ("-3", "-3", 2.0),
    ("\u22123", "-3", 2.0),  # Unicode minus sign
    ("3", "-3", 0.0),
    ("2.50", "2.5", 2.0),
    ("2.5", "2.05", 0.0),
    ("Paris", "Paris", 2.0),
    ("paris", "Paris", 0.0),
    ("\\frac{1}{2}", "0.5", 0.0),  # equivalent, but that is math_equivalence's call
    ("18 apples and 3 pears", "18", 0.0),
])
def test_correctness(model_answer, gold, expected):
    assert score(correctness, tagged(model_answer), gold) == expected


def test_correctness_grades_the_last_of_two_answers():
    two = "<answer>3</answer> wait, I made a mistake. <answer>4</answer>"
    assert score(correctness, two, "4") == 2.0
    assert score(correctness, two, "3") == 0.0


def test_correctness_needs_a_closed_answer_tag():
    assert score(correctness, "72") == 0.0
    assert score(correctness, "<reasoning>...</reasoning><answer>72") == 0.0  # truncated
    assert score(correctness, "<answer>72</answer> and then some text") == 2.0


def test_correctness_without_a_gold_answer_does_not_apply():
    assert score(correctness, tagged("72"), None) is None


@pytest.mark.parametrize("model_answer, expected", [
    ("72", 0.5), ("-3", 0.5), ("1,000", 0.5), ("$18", 0.5), ("7.0", 0.5),
    ("2.5", 0.0), ("seven", 0.0), ("", 0.0), ("1/2", 0.0),
])
def test_int(model_answer, expected):
    assert score(int_reward, tagged(model_answer)) == expected


def test_int_without_an_answer():
    assert score(int_reward, "72") == 0.0


@pytest.mark.parametrize("completion, expected", [
    (STRICT, 0.5),
    ("<reasoning>\nline one\nline two\n</reasoning>\n<answer>\n72\n</answer>\n", 0.5),
    (STRICT.rstrip("\n"), 0.0),  # the final newline is part of the format
    (STRICT + "\n", 0.0),  # `$` alone would accept this; the format ends at one newline
    (STRICT + "more", 0.0),
    (" " + STRICT, 0.0),
    ("<reasoning>9 * 8</reasoning>\n<answer>\n72\n</answer>\n", 0.0),
    ("<reasoning>\n9 * 8\n</reasoning>\n\n<answer>\n72\n</answer>\n", 0.0),
])
def test_strict_format(completion, expected):
    assert score(strict_format, completion) == expected


@pytest.mark.parametrize("completion, expected", [
    (STRICT, 0.5),
    ("<reasoning>short</reasoning><answer>72</answer>", 0.5),
    ("<reasoning>\nline one\nline two\n</reasoning>\n\n  <answer>72</answer> trailing", 0.5),
    ("Let me think. <reasoning>x</reasoning> <answer>72</answer>", 0.5),
    ("<answer>72</answer>", 0.0),
    ("<answer>72</answer><reasoning>x</reasoning>", 0.0),
    ("<reasoning>x</reasoning> text between <answer>72</answer>", 0.0),
    ("<reasoning>x</reasoning><answer>72", 0.0),
])
def test_soft_format(completion, expected):
    assert score(soft_format, completion) == expected


@pytest.mark.parametrize("completion, expected", [
    (STRICT, 0.5),
    (STRICT + "extra", 0.5 - 0.005),  # five characters after the format's final newline
    (STRICT.rstrip("\n"), 0.5),
    ("<reasoning>\nx\n</reasoning>\n", 0.25),
    ("no tags at all", 0.0),
    ("<reasoning>\nx\n</reasoning>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>\n", 0.25),  # answer tags twice
])
def test_xmlcount(completion, expected):
    assert score(xmlcount, completion) == pytest.approx(expected)


def test_completion_text_accepts_the_forms_trl_passes():
    assert completion_text("plain") == "plain"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
                    {"role": "tool", "content": "t"}, {"role": "assistant", "content": "last"}]
    assert completion_text(conversation) == "last"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]) == "ab"
    assert completion_text({"role": "assistant", "content": "one message"}) == "one message"
    assert completion_text([]) == ""
    assert completion_text(None) == ""
    assert completion_text("bad \udcff half") == "bad ? half"
    assert completion_text(b"\xff\xfeok") == "\ufffd\ufffdok"
    with pytest.raises(TypeError, match="a completion must be a string or a list of"):
        completion_text(42)


def test_extract_answer_and_parse_number():
    assert extract_answer("<answer> 1 </answer><answer>\n 2 \n</answer>") == "2"
    assert extract_answer("<answer>1</answer><answer>2") == "1"
    assert extract_answer("no tags") is None
    assert extract_answer("</answer><answer>") is None
    assert parse_number("1,080") == "1080"
    assert parse_number("18 dollars") == "18"
    assert parse_number("-4.50 km") == "-4.5"
    assert parse_number("x = 4") is None
    assert parse_number("4 apples and 3 pears") is None
    assert parse_number("9" * 200) is None


def test_the_answer_format_is_the_one_the_prompt_asks_for():
    # said once (grpoflow/answer_format.py); these are the texts the prompt and the rewards had before
    from grpoflow.answer_format import SOFT_FORMAT, STRICT_FORMAT, SYSTEM_PROMPT, format_answer
    from grpoflow.config import DEFAULT_SYSTEM_PROMPT

    assert DEFAULT_SYSTEM_PROMPT == SYSTEM_PROMPT == ("Respond in the following format:\n<reasoning>\n...\n"
                                                      "</reasoning>\n<answer>\n...\n</answer>")
    assert format_answer("9 * 8 = 72", "72") == STRICT
    assert STRICT_FORMAT.pattern == r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n"
    assert SOFT_FORMAT.pattern == r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    assert score(strict_format, format_answer("work", "72")) == 0.5
    assert score(xmlcount, format_answer("work", "72")) == 0.5
