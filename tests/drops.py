"""Rows and drop files for the continuous-flow tests: GSM8K-shaped questions with their worked answers."""

from __future__ import annotations

import json


def rows(numbers) -> list[dict]:
    return [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in numbers]


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
