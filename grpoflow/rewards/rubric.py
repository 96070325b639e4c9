"""Rubric rewards: criteria declared in a YAML file, no code.

    name: email                  # metric name: rewards/email/mean (default: the file's stem)
    criteria:
      - mentions_column: recipient   # the value of the row's `recipient` column appears
        reward: 1.0
      - contains: "thank"            # the text appears (case-insensitive)
        reward: 0.5
      - regex: "(?m)^Best regards,$" # re.search finds the pattern
        reward: 1.0
      - equals_column: answer        # the whole completion, stripped, equals the column
        reward: 1.0
      - longer_than: 1200            # more than 1200 characters
        reward: -1.0

Each criterion has exactly one check and a `reward`; a completion scores the sum of the
rewards of the criteria it meets. Use it in a config as `rubric(path="configs/rubrics/email.yaml")`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grpoflow.errors import ConfigError
from grpoflow.rewards.registry import register_factory
from grpoflow.rewards.text import completion_text

CHECKS = ("contains", "equals_column", "longer_than", "mentions_column", "regex")
TOP_LEVEL_KEYS = ("name", "criteria")


class RubricError(ConfigError):
    """A rubric file is wrong. The message names the file and the criterion."""


@dataclass(frozen=True)
class Criterion:
    check: str  # one of CHECKS
    value: Any  # the text, column name, length or compiled pattern the check uses
    reward: float

    def met(self, text: str, row: dict[str, Any]) -> bool:
        if self.check == "contains":
            return self.value.casefold() in text.casefold()
        if self.check == "regex":
            return self.value.search(text) is not None
        if self.check == "longer_than":
            return len(text) > self.value
        wanted = row[self.value]
        if wanted is None or str(wanted).strip() == "":
            return False  # nothing to mention or match: the row has no value
        if self.check == "mentions_column":
            return str(wanted).strip().casefold() in text.casefold()
        return text.strip() == str(wanted).strip()  # equals_column

    @property
    def column(self) -> str | None:
        return self.value if self.check in ("equals_column", "mentions_column") else None


def load_rubric(path: str | Path) -> tuple[str, list[Criterion]]:
    """Read and check a rubric file; returns its name and criteria."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RubricError(f"rubric file not found: {path.resolve()}") from None
    except yaml.YAMLError as e:
        raise RubricError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("criteria"), list) or not data["criteria"]:
        raise RubricError(f"{path}: expected a mapping with a non-empty 'criteria' list (see {__file__})")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise RubricError(f"{path}: unknown key '{key}'{_did_you_mean(key, TOP_LEVEL_KEYS)}; "
                              f"allowed: {', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise RubricError(f"{path}: 'name' must be a non-empty string, got {name!r}")
    return name, [_criterion(path, i, raw) for i, raw in enumerate(data["criteria"], start=1)]


def _criterion(path: Path, index: int, raw: Any) -> Criterion:
    where = f"{path}: criterion {index}"
    if not isinstance(raw, dict):
        raise RubricError(f"{where}: expected a mapping like {{contains: 'thank', reward: 1.0}}, got {raw!r}")
    for key in raw:
        if key != "reward" and key not in CHECKS:
            raise RubricError(f"{where}: unknown key '{key}'{_did_you_mean(key, (*CHECKS, 'reward'))}; "
                              f"a criterion has one of {', '.join(CHECKS)} and a reward")
    checks = [k for k in raw if k in CHECKS]
    if len(checks) != 1:
        found = ", ".join(checks) if checks else "none"
        raise RubricError(f"{where}: needs exactly one check of {', '.join(CHECKS)}; found {found}")
    check, value = checks[0], raw[checks[0]]
    where = f"{where} ({check})"
    reward = raw.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise RubricError(f"{where}: 'reward' must be a number, got {reward!r}")
    if check == "longer_than":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RubricError(f"{where}: expected a whole number of characters, got {value!r}")
    elif not isinstance(value, str) or not value:
        raise RubricError(f"{where}: expected a non-empty string, got {value!r}")
    if check == "regex":
        try:
            value = re.compile(value)
        except re.error as e:
            raise RubricError(f"{where}: invalid regular expression {raw[check]!r}: {e}") from None
    return Criterion(check, value, float(reward))


def _did_you_mean(key: Any, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@register_factory("rubric")
def rubric(path: str, name: str | None = None):
    """A reward from a rubric file; `name` overrides the file's own name in metrics."""
    rubric_name, criteria = load_rubric(path)
    columns = sorted({c.column for c in criteria if c.column})

    def score(prompts, completions, **row_columns) -> list[float]:
        missing = [c for c in columns if c not in row_columns]
        if missing:
            raise ValueError(
                f"rubric {path} needs the dataset column(s) {', '.join(missing)}; this batch has "
                f"{', '.join(sorted(row_columns)) or 'no columns'}"
            )
        rewards = []
        for i, completion in enumerate(completions):
            text = completion_text(completion)
            row = {c: row_columns[c][i] for c in columns}
            rewards.append(sum((c.reward for c in criteria if c.met(text, row)), 0.0))
        return rewards

    score.__name__ = name or rubric_name
    return score
