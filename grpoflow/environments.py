"""Environments: what a rollout's conversation starts from and what answers each of the model's turns.

    env = make_environment(cfg.rollout)              # rollout.environment: single_turn | python_tool
    messages = env.reset(row)                        # the chat the model answers first
    observation, done, parts = env.step(messages, completion)   # after each model turn

The names are OpenEnv's and TRL's (`reset`, `step`, an observation, `done`). `messages` is the
conversation so far, the model's last turn included (role "assistant"); `completion` is that
turn's text. An observation (a str) goes back to the model as a message of role "tool", rendered
by the chat template, and the model takes another turn; None with done=True ends the episode.
`parts` are counts the episode sums (python_tool: tool_calls, tool_errors): the rewards receive
them as columns of those names, and the evaluation reports their means.

grpoflow/rollout/episodes.py runs the turns on a rollout engine, within rollout.max_turns and
grpo.max_completion_length tokens in all.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Protocol

from grpoflow.rollout.base import Messages
from grpoflow.verifiers.tool import run_python


class StepResult(NamedTuple):
    observation: str | None  # the tool's message for the model's next turn; None: no next turn
    done: bool
    parts: dict[str, int]  # counts the episode sums, for the rewards (e.g. tool_calls, tool_errors)


class Environment(Protocol):
    name: str
    columns: tuple[str, ...]  # the parts' names: the reward columns this environment adds

    def reset(self, row: dict[str, Any]) -> Messages:
        ...

    def step(self, messages: Messages, completion: str) -> StepResult:
        ...


class SingleTurn:
    """One answer per prompt, nothing after it: GRPO as it always was (the default)."""

    name = "single_turn"
    columns: tuple[str, ...] = ()

    def reset(self, row: dict[str, Any]) -> Messages:
        return row["prompt"]

    def step(self, messages: Messages, completion: str) -> StepResult:
        return StepResult(None, True, {})


# A fenced block the model means to run: ```python ... ``` (or py, python3), closed.
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3|python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class PythonTool:
    """The model may run Python: a turn that contains a closed ```python block and ends at the
    end-of-turn token gets the last such block run in the code sandbox (grpoflow/verifiers/tool.py)
    and its output back as a tool message. A turn without one is the final answer.

    An error (an exception, a limit, a refused import) comes back as the tool message, as a
    traceback would, and the episode goes on: the model may fix its code. It counts in
    tool_errors."""

    name = "python_tool"
    columns = ("tool_calls", "tool_errors")

    def __init__(self, max_output_chars: int = 1000):
        self.max_output_chars = max_output_chars

    def reset(self, row: dict[str, Any]) -> Messages:
        return row["prompt"]

    def step(self, messages: Messages, completion: str) -> StepResult:
        blocks = _CODE_BLOCK.findall(completion)
        if not blocks:
            return StepResult(None, True, {"tool_calls": 0, "tool_errors": 0})
        run = run_python(blocks[-1], max_output_chars=self.max_output_chars)
        text = run.output
        if run.output_chars > len(run.output):
            text += f"\n[output cut: {run.output_chars} characters, the first {len(run.output)} shown]"
        if run.error is not None:
            text += ("\n" if text and not text.endswith("\n") else "") + f"Error: {run.error}"
        return StepResult(text if text else "[no output]", False,
                          {"tool_calls": 1, "tool_errors": int(run.error is not None)})


ENVIRONMENTS = {"single_turn": SingleTurn, "python_tool": PythonTool}


def make_environment(rollout) -> Environment:
    """rollout: the config's rollout section (its `environment` key)."""
    return ENVIRONMENTS[rollout.environment]()
