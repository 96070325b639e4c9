"""Rewards for GRPO: built-ins, your own functions, YAML rubrics, and combining them.

A reward follows TRL's convention:

    def reward(prompts: list, completions: list, **columns) -> list[float | None]

`completions` are strings, or lists of {role, content} messages for conversational data;
each dataset column (`answer`, `question`, ...) arrives as a list with one value per
completion. Return one float per completion, or None where the reward does not apply.
`async def` rewards are awaited concurrently.

In a config, `grpo.reward_funcs` names them (see loader.py for the forms) and
`grpo.reward_weights` weighs them; RewardSet (reward_set.py) scores a batch with them.

Registered names:
    correctness, int, strict_format, soft_format, xmlcount   gsm8k.py
    math_equivalence                                        equivalence.py
    proximity(zero_at=0.5)                                  proximity.py
    regex(pattern, reward=1.0)                              pattern.py
    length_penalty(max_chars, per_char=0.001)               length.py
    rubric(path)                                            rubric.py
"""

# Importing the built-ins registers them.
from grpoflow.rewards import equivalence, gsm8k, length, pattern, proximity, rubric  # noqa: F401
from grpoflow.rewards.loader import NamedReward, RewardSpecError, load_reward
from grpoflow.rewards.registry import register, register_factory, registered_names
from grpoflow.rewards.reward_set import RewardSet, Scores
from grpoflow.rewards.rubric import RubricError
from grpoflow.rewards.text import completion_text, extract_answer, parse_number

__all__ = [
    "NamedReward", "RewardSet", "RewardSpecError", "RubricError", "Scores", "completion_text",
    "extract_answer", "load_reward", "parse_number", "register", "register_factory", "registered_names",
]
