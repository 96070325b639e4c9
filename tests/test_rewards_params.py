"""Rewards with parameters: proximity, regex, length_penalty and YAML rubrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpoflow.rewards import RewardSet, RewardSpecError, RubricError, load_reward
from grpoflow.rewards.rubric import load_rubric

EMAIL_RUBRIC = Path(__file__).resolve().parents[1] / "configs" / "rubrics" / "email.yaml"


def run(spec, completions, **columns):
    return load_reward(spec).fn(prompts=["p"] * len(completions), completions=completions, **columns)


@pytest.mark.parametrize("model_answer, expected", [
    ("100", 1.0), ("90", 0.8), ("110", 0.8), ("150", 0.0), ("175", -0.5), ("200", -1.0),
    ("100000", -1.0), ("1e2", -1.0), ("a hundred", -1.0), ("$100", 1.0), ("100 dollars", 1.0),
])
def test_proximity(model_answer, expected):
    assert run("proximity", [f"<answer>{model_answer}</answer>"], answer=["100"]) == [pytest.approx(expected)]


def test_proximity_settings_and_edge_cases():
    assert run("proximity(zero_at=0.1)", ["<answer>95</answer>"], answer=["100"]) == [pytest.approx(0.5)]
    assert run("proximity", ["<answer>-90</answer>"], answer=["-100"]) == [pytest.approx(0.8)]
    assert run("proximity", ["<answer>0.25</answer>"], answer=["0"]) == [pytest.approx(0.5)]  # error relative to 1
    assert run("proximity", ["<answer>1,000</answer>"], answer=["1000"]) == [1.0]
    assert run("proximity", ["no answer"], answer=["1000"]) == [-1.0]
    assert run("proximity", ["<answer>Paris</answer>"], answer=["Paris"]) == [None]


def test_regex():
    spec = r"regex(pattern='(?m)^Best regards,$', reward=0.5, name='signoff')"
    assert run(spec, ["Hi\nBest regards,\nAna", "Best regards, Ana", ""]) == [0.5, 0.0, 0.0]


def test_length_penalty():
    spec = "length_penalty(max_chars=5)"
    assert run(spec, ["12345", "1234567890", "x" * 1_000_000, ""]) == [0.0, pytest.approx(-0.005), -1.0, 0.0]
    assert run("length_penalty(max_chars=5, per_char=0.1)", ["1234567"]) == [pytest.approx(-0.2)]


GOOD_EMAIL = """Dear Ana,

Thank you for sending the report so quickly. I have read it and agree with the plan.

Best regards,
Sam Lee
Operations"""


def test_email_rubric():
    spec = f"rubric(path='{EMAIL_RUBRIC}')"
    long_email = GOOD_EMAIL.replace("quickly.", "quickly. " + "More detail. " * 100)
    unsigned = GOOD_EMAIL.split("Best regards")[0]
    completions = [GOOD_EMAIL, long_email, unsigned, GOOD_EMAIL, "", GOOD_EMAIL + "\n"]
    rewards = run(spec, completions, recipient=["Ana", "Ana", "Ana", "Bo", "Ana", "Ana"],
                  keyword=["report", "report", "report", "report", "report", "budget"],
                  reference=["other"] * 5 + [GOOD_EMAIL])
    assert rewards == [
        1.0 + 1.0 + 1.0,               # keyword, names Ana, signs
        1.0 + 1.0 + 1.0 - 1.0,         # the same, over 1200 characters
        1.0 + 1.0,                     # no signature block
        1.0 + 1.0,                     # the row's recipient is Bo, not Ana
        0.0,
        1.0 + 1.0 + 1.0,               # no 'budget', but the exact reference (ends stripped)
    ]
    assert load_reward(spec).name == "email"


def test_rubric_checks_exact_column_match(tmp_path):
    path = tmp_path / "exact.yaml"
    path.write_text("criteria:\n  - equals_column: answer\n    reward: 2\n  - contains: '?'\n    reward: -0.5\n")
    reward = load_reward(f"rubric(path='{path}', name='exact_answer')")
    assert reward.name == "exact_answer"
    assert reward.fn(prompts=["p"] * 3, completions=[" Lisbon\n", "Lisbon?", "Porto"], answer=["Lisbon"] * 3) \
        == [2.0, -0.5, 0.0]


def test_rubric_missing_column_is_an_error_for_the_reward_set():
    scores = RewardSet([f"rubric(path='{EMAIL_RUBRIC}')"]).score(["p"], [GOOD_EMAIL])
    assert scores.per_reward["email"] == [None] and scores.errors["email"] == 1


@pytest.mark.parametrize("text, message", [
    ("criteria:\n  - contain: thanks\n    reward: 1\n",
     "criterion 1: unknown key 'contain' (did you mean 'contains'?); a criterion has one of contains, "
     "equals_column, longer_than, mentions_column, regex and a reward"),
    ("criteria:\n  - contains: a\n    reward: 1\n  - contains: b\n    regex: c\n    reward: 1\n",
     "criterion 2: needs exactly one check of contains, equals_column, longer_than, mentions_column, regex; "
     "found contains, regex"),
    ("criteria:\n  - regex: '(unclosed'\n    reward: 1\n",
     "criterion 1 (regex): invalid regular expression '(unclosed': missing ), unterminated subpattern at position 0"),
    ("criteria:\n  - contains: a\n", "criterion 1 (contains): 'reward' must be a number, got None"),
    ("criteria:\n  - longer_than: lots\n    reward: -1\n",
     "criterion 1 (longer_than): expected a whole number of characters, got 'lots'"),
    ("criteria:\n  - mentions_column: ''\n    reward: 1\n",
     "criterion 1 (mentions_column): expected a non-empty string, got ''"),
    ("criteria:\n  - thanks\n", "criterion 1: expected a mapping like {contains: 'thank', reward: 1.0}, got 'thanks'"),
    ("criterias: []\n", "expected a mapping with a non-empty 'criteria' list"),
    ("name: x\ncriteria:\n  - contains: a\n    reward: 1\nweight: 2\n",
     "unknown key 'weight'; allowed: name, criteria"),
    ("criteria: [\n", "not valid YAML"),
])
def test_bad_rubrics_name_the_file_and_criterion(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RubricError) as e:
        load_rubric(path)
    assert str(e.value).startswith(f"{path}: {message}")
    with pytest.raises(RewardSpecError, match="^reward 'rubric"):  # the same through a config entry
        load_reward(f"rubric(path='{path}')")


def test_missing_rubric_file(tmp_path):
    with pytest.raises(RubricError) as e:
        load_rubric(tmp_path / "nope.yaml")
    assert str(e.value) == f"rubric file not found: {tmp_path / 'nope.yaml'}"
