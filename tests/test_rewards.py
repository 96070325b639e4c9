"""Reward API: loading by name / parameters / file / module, RewardSet totals, metrics,
async concurrency and error handling. Built-ins have their own test files."""

from __future__ import annotations

import asyncio
import logging
import math
import textwrap
import time

import pytest

from grpoflow.errors import UserError
from grpoflow.rewards import RewardSet, RewardSpecError, load_reward, register
from grpoflow.rewards.gsm8k import correctness

GOOD = "<reasoning>\n9 * 8\n</reasoning>\n<answer>\n72\n</answer>\n"


# --- loading ---------------------------------------------------------------------------

def test_registered_name_loads_the_registered_function():
    reward = load_reward("correctness")
    assert reward.name == "correctness" and reward.fn is correctness


def test_factory_with_parameters_takes_its_name_from_the_name_parameter():
    reward = load_reward("regex(pattern='^Dear', reward=0.25, name='greeting')")
    assert reward.name == "greeting"
    assert reward.fn(prompts=["p", "p"], completions=["Dear Ana", "Hi Ana"]) == [0.25, 0.0]


def test_factory_with_all_defaults_can_be_named_bare():
    assert load_reward("proximity").name == "proximity"


def test_unknown_name_suggests_close_names():
    with pytest.raises(RewardSpecError) as e:
        load_reward("corectness")
    message = str(e.value)
    assert message.startswith("unknown reward 'corectness'. Did you mean 'correctness'? Registered rewards: ")
    assert message.endswith(
        "For your own function write 'path/to/file.py:function' or 'package.module:function'."
    )


def test_unknown_name_without_close_names_gives_no_suggestion():
    with pytest.raises(RewardSpecError, match=r"^unknown reward 'zzzz'\. Registered rewards: correctness, "):
        load_reward("zzzz")


@pytest.mark.parametrize("spec, message", [
    ("correctness(x=1)", "reward 'correctness(x=1)': 'correctness' takes no parameters; write it as correctness"),
    ("regex", "reward 'regex': regex needs pattern; write it as regex(pattern=...)"),
    ("regex(patern='a')", "reward 'regex(patern='a')': regex() has no parameter 'patern'; its parameters are "
                          "pattern, reward, name"),
    ("regex('a')", "reward 'regex('a')': give parameters by name, e.g. regex(pattern='...')"),
    ("regex(pattern=foo)", "reward 'regex(pattern=foo)': parameter 'pattern' must be a literal (a quoted string, "
                           "a number, True/False/None or a list of those), got foo"),
    ("regex(pattern='(')", "reward 'regex(pattern='(')': regex: invalid pattern '(': missing ), unterminated "
                           "subpattern at position 0"),
    ("length_penalty(max_chars=-1)", "reward 'length_penalty(max_chars=-1)': length_penalty: max_chars must be "
                                     "a whole number >= 0, got -1"),
    ("proximity(zero_at='0.5')", "reward 'proximity(zero_at='0.5')': proximity: zero_at must be a number > 0, "
                                 "got '0.5'"),
])
def test_bad_parameters_say_what_to_write(spec, message):
    with pytest.raises(RewardSpecError) as e:
        load_reward(spec)
    assert str(e.value) == message


def test_function_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shouty(prompts, completions, **_):
            return [1.0 if c.isupper() else 0.0 for c in completions]
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.chdir(tmp_path)
    reward = load_reward("my_rewards.py:shouty")
    assert reward.name == "shouty"
    assert reward.fn(prompts=["p", "p"], completions=["YES", "no"]) == [1.0, 0.0]

    with pytest.raises(RewardSpecError) as e:
        load_reward("my_rewards.py:shouti")
    assert str(e.value) == "reward 'my_rewards.py:shouti': my_rewards.py has no function 'shouti'; did you mean 'shouty'?"
    with pytest.raises(RewardSpecError) as e:
        load_reward("my_rewards.py:NOT_A_FUNCTION")
    assert str(e.value) == "reward 'my_rewards.py:NOT_A_FUNCTION': 'NOT_A_FUNCTION' in my_rewards.py is a int, not a function"
    with pytest.raises(RewardSpecError) as e:
        load_reward("missing.py:shouty")
    assert str(e.value) == f"reward 'missing.py:shouty': file not found: {tmp_path.resolve() / 'missing.py'}"


def test_file_that_fails_on_import_names_the_file_and_the_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("1 / 0\n")
    with pytest.raises(RewardSpecError) as e:
        load_reward(f"{broken}:anything")
    assert str(e.value) == f"reward '{broken}:anything': running {broken} failed: ZeroDivisionError: division by zero"


def test_function_from_a_module(tmp_path, monkeypatch):
    package = tmp_path / "team_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "judges.py").write_text("def polite(prompts, completions, **_):\n    return [0.5 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("team_rewards.judges:polite")
    assert reward.name == "polite" and reward.fn(prompts=["p"], completions=["x"]) == [0.5]
    assert load_reward("grpoflow.rewards.gsm8k:correctness").fn is correctness

    with pytest.raises(RewardSpecError) as e:
        load_reward("team_rewards.nope:polite")
    assert str(e.value) == ("reward 'team_rewards.nope:polite': no module named 'team_rewards.nope'; install it or "
                            "add its folder to PYTHONPATH (for a file, write 'path/to/file.py:function')")
    with pytest.raises(RewardSpecError) as e:
        load_reward("team_rewards.judges:rude")
    assert str(e.value) == "reward 'team_rewards.judges:rude': module 'team_rewards.judges' has no function 'rude'"


def test_a_taken_name_cannot_be_registered_again():
    with pytest.raises(ValueError) as e:
        register("correctness")(lambda prompts, completions, **_: [0.0] * len(completions))
    assert str(e.value) == ("a reward named 'correctness' is already registered, by "
                            "grpoflow.rewards.gsm8k.correctness; pick another name")
    assert load_reward("correctness").fn is correctness


# --- RewardSet ----------------------------------------------------------------------------

def constant(value):
    def reward(prompts, completions, **_):
        return [value] * len(completions)
    reward.__name__ = f"constant_{value}"
    return reward


def test_weights_must_match_rewards():
    with pytest.raises(RewardSpecError) as e:
        RewardSet(["correctness", "int"], reward_weights=[1.0])
    assert str(e.value) == "reward_weights has 1 values but reward_funcs has 2; give one weight per reward function"


def test_two_rewards_with_one_name_are_refused():
    with pytest.raises(RewardSpecError, match="two rewards are named 'regex'"):
        RewardSet(["regex(pattern='a')", "regex(pattern='b')"])


def test_totals_are_weighted_sums_that_skip_none():
    def only_first(prompts, completions, **_):
        return [1.0] + [None] * (len(completions) - 1)

    rewards = RewardSet([constant(2.0), only_first], reward_weights=[0.5, 3.0])
    scores = rewards.score(["p", "p"], ["a", "b"])
    assert scores.per_reward == {"constant_2.0": [2.0, 2.0], "only_first": [1.0, None]}
    assert scores.totals == [0.5 * 2.0 + 3.0 * 1.0, 0.5 * 2.0]


def test_a_completion_no_reward_applies_to_totals_zero_and_nan_means_none():
    def nan_reward(prompts, completions, **_):
        return [math.nan] * len(completions)

    scores = RewardSet([nan_reward, constant(None)]).score(["p"], ["a"])
    assert scores.per_reward == {"nan_reward": [None], "constant_None": [None]}
    assert scores.totals == [0.0]
    metrics = scores.metrics(num_generations=1)
    assert math.isnan(metrics["rewards/nan_reward/mean"]) and math.isnan(metrics["rewards/nan_reward/std"])


def test_metrics_use_trl_names_and_group_std():
    def by_text(prompts, completions, **_):
        return [float(c) for c in completions]

    scores = RewardSet([by_text]).score(["p"] * 4, ["1", "3", "2", "2"])
    metrics = scores.metrics(num_generations=2)
    assert metrics["rewards/by_text/mean"] == 2.0
    assert metrics["rewards/by_text/std"] == pytest.approx(math.sqrt(2 / 3))  # unbiased, like torch.std
    assert metrics["rewards/by_text/errors"] == 0.0
    assert metrics["reward"] == 2.0
    assert metrics["reward_std"] == pytest.approx((math.sqrt(2) + 0.0) / 2)  # groups [1, 3] and [2, 2]
    assert metrics["frac_reward_zero_std"] == 0.5
    with pytest.raises(ValueError, match="num_generations=3 does not divide the batch of 4 completions"):
        scores.metrics(num_generations=3)


def test_gsm8k_set_on_conversational_completions():
    rewards = RewardSet(["correctness", "int", "strict_format", "soft_format", "xmlcount"])
    messages = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": "I think 72"}]]
    scores = rewards.score([[{"role": "user", "content": "9*8?"}]] * 2, messages, answer=["72", "72"])
    assert scores.totals == [2.0 + 0.5 + 0.5 + 0.5 + 0.5, 0.0]


def test_columns_must_have_one_value_per_completion():
    with pytest.raises(ValueError, match="'answer' has 1 values for 2 completions; give one per completion"):
        RewardSet(["correctness"]).score(["p", "p"], ["a", "b"], answer=["1"])


# Each slow reward notes when it started and ended: concurrency is the intervals overlapping, which a
# loaded machine stretches but cannot undo (a wall-time bound flaked on a busy 2-core machine).
SPANS: dict[str, tuple[float, float]] = {}


async def slow_a(prompts, completions, **_):
    start = time.perf_counter()
    await asyncio.sleep(0.2)
    SPANS["a"] = (start, time.perf_counter())
    return [1.0] * len(completions)


async def slow_b(prompts, completions, **_):
    start = time.perf_counter()
    await asyncio.sleep(0.2)
    SPANS["b"] = (start, time.perf_counter())
    return [2.0] * len(completions)


def slow_sync(prompts, completions, **_):
    start = time.perf_counter()
    time.sleep(0.2)
    SPANS["sync"] = (start, time.perf_counter())
    return [4.0] * len(completions)


def overlap(x: str, y: str) -> bool:
    (a0, a1), (b0, b1) = SPANS[x], SPANS[y]
    return a0 < b1 and b0 < a1


def test_async_rewards_run_concurrently():
    SPANS.clear()
    scores = RewardSet([slow_a, slow_b]).score(["p", "p"], ["a", "b"])
    assert scores.totals == [3.0, 3.0]
    assert overlap("a", "b"), f"the two async rewards ran one after the other: {SPANS}"


def test_async_rewards_run_concurrently_with_sync_ones():
    SPANS.clear()
    scores = RewardSet([slow_a, slow_sync, slow_b]).score(["p"], ["a"])
    assert scores.totals == [7.0]
    assert overlap("a", "b") and overlap("a", "sync") and overlap("b", "sync"), f"not all at once: {SPANS}"


def picky(prompts, completions, **_):
    for c in completions:
        if "bad" in c:
            raise ValueError(f"cannot score {c!r}")
    return [1.0] * len(completions)


async def picky_async(prompts, completions, **_):
    return picky(prompts, completions)


@pytest.mark.parametrize("reward", [picky, picky_async])
def test_a_raising_reward_costs_only_the_bad_completions(reward, caplog):
    rewards = RewardSet([reward, constant(0.5)])
    with caplog.at_level(logging.WARNING, logger="grpoflow.rewards"):
        first = rewards.score(["p"] * 3, ["ok", "bad", "ok"])
        second = rewards.score(["p"] * 3, ["bad", "ok", "ok"])
    name = reward.__name__
    assert first.per_reward[name] == [1.0, None, 1.0]
    assert first.totals == [1.5, 0.5, 1.5]
    assert first.metrics(num_generations=3)[f"rewards/{name}/errors"] == 1.0
    assert second.errors[name] == 1
    logged = [r for r in caplog.records if r.name == "grpoflow.rewards"]
    # Batch failure "cannot score 'bad'" and the same error on its own: one distinct error.
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].getMessage().startswith(f"reward '{name}' raised ValueError: cannot score 'bad'")


def needs_setup(prompts, completions, **_):
    raise UserError("the code sandbox finds no isolation here; install bubblewrap")


async def needs_setup_async(prompts, completions, **_):
    return needs_setup(prompts, completions)


@pytest.mark.parametrize("reward", [needs_setup, needs_setup_async])
def test_a_user_error_stops_scoring(reward):
    # No retry fixes a setting: the run stops with its message instead of logging None scores.
    with pytest.raises(UserError, match="install bubblewrap"):
        RewardSet([reward, constant(0.5)]).score(["p"] * 2, ["a", "b"])


def test_wrong_return_values_are_errors_not_crashes(caplog):
    def wrong_length(prompts, completions, **_):
        return [1.0, 1.0, 1.0]

    def strings(prompts, completions, **_):
        return ["1.0"] * len(completions)

    with caplog.at_level(logging.WARNING, logger="grpoflow.rewards"):
        scores = RewardSet([wrong_length, strings, constant(1.0)]).score(["p", "p"], ["a", "b"])
    assert scores.per_reward["wrong_length"] == [None, None]
    assert scores.per_reward["strings"] == [None, None]
    assert scores.errors == {"wrong_length": 2, "strings": 2, "constant_1.0": 0}
    assert scores.totals == [1.0, 1.0]
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "reward 'wrong_length' returned 3 values for 2 completions" in messages
    assert "reward 'strings' returned '1.0'; expected a float or None per completion" in messages
