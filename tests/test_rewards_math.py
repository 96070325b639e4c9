"""math_equivalence, with the real math-verify in its child process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpoflow.rewards.equivalence import MathVerifyProcess, math_equivalence


def score(completion, gold):
    return math_equivalence(prompts=["p"], completions=[completion], answer=[gold])[0]


@pytest.mark.parametrize("model_answer, gold", [
    ("0.5", "0.5"),
    ("1/2", "0.5"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "0.5"),  # math-verify 0.9 finds this only inside $...$
    ("\\dfrac{1}{2}", "1/2"),
    ("0.5", "\\frac{1}{2}"),
    ("$\\frac{1}{2}$", "0.50"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("$18", "18"),
    ("18 dollars", "18"),
    ("\u22123", "-3"),
])
def test_equal(model_answer, gold):
    assert score(f"<answer>{model_answer}</answer>", gold) == 1.0


@pytest.mark.parametrize("model_answer, gold", [
    ("2", "1/2"),
    ("0.333", "1/3"),
    ("3,5", "3.5"),  # a decimal comma, or 3 and 5: not one number (math-verify alone says 3.5)
    ("2, 3", "23"),  # two numbers, not 23
    ("", "72"),
    ("seventy-two", "72"),
])
def test_not_equal(model_answer, gold):
    assert score(f"<answer>{model_answer}</answer>", gold) == 0.0


def test_without_answer_tags_the_end_of_the_completion_is_read():
    assert score("So 9 * 8 is \\boxed{72}.", "72") == 1.0
    assert score("So 9 * 8 is \\boxed{71}.", "72") == 0.0


def test_the_last_of_two_answers_counts():
    assert score("<answer>1/3</answer> no: <answer>\\frac{1}{2}</answer>", "0.5") == 1.0


def test_gold_answers_math_verify_cannot_read_do_not_apply():
    assert score("<answer>Paris</answer>", "Paris") is None
    assert score("<answer>1</answer>", None) is None


def test_safe_from_worker_threads():
    # In-process math-verify raises here ("signal only works in main thread").
    batch = {"prompts": ["p"] * 4, "completions": ["<answer>\\frac{1}{2}</answer>", "<answer>0.4</answer>"] * 2,
             "answer": ["0.5"] * 4}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: math_equivalence(**batch), range(4)))
    assert results == [[1.0, 0.0, 1.0, 0.0]] * 4


def test_a_check_that_overruns_is_killed_and_scored_false():
    checker = MathVerifyProcess(answer_timeout_s=0.3)
    try:
        assert checker.equivalent("0.5", "1/2") is True
        first = checker._proc.pid
        start = time.perf_counter()
        # sympy evaluates 2^(2^40) until math-verify's own 1 s alarm; we stop waiting at 0.3 s and
        # kill the process (no wall-time bound here beyond "not stuck": CI machines are loaded)
        assert checker.equivalent("5", "$2^{2^{40}}$") is False
        assert time.perf_counter() - start < 10
        assert checker._proc is None or checker._proc.pid != first  # the overrunning process is gone
        assert checker.equivalent("0.5", "1/2") is True  # a fresh process took over
        assert checker._proc.pid != first
    finally:
        checker.close()
