"""Data prep, row by row: each source row becomes an Example or a Reject with its reason.

    parse_split   per row: the question and the final answer as text, or a reject
    dedupe        the same question twice in a split: the first copy is kept (none when answers differ)
    seeded_split  a held-out set drawn from train, where the source has none
    drop_overlap  train questions that are also held out
    limit_rows    data.max_train_rows / data.max_heldout_rows

Each reason is one of stages/prepare.py's REJECT_REASONS, which says what it means to the user.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from grpoflow.config import DataConfig
from grpoflow.data_files import RawRow, shown
from grpoflow.errors import UserError
from grpoflow.normalize import GSM8K_MARKER, normalize_number, split_gsm8k


class DataError(UserError, ValueError):
    """The data cannot be prepared as configured; the message says which key or file to change."""


@dataclass
class Example:
    question: str
    answer: str
    solution: str | None
    origin: str
    metadata: str | None
    key: str  # normalised question, for dedupe and overlap
    raw: str  # the source row as read, kept for the rejects file

    def record(self, system_prompt: str) -> dict[str, Any]:
        prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
        prompt.append({"role": "user", "content": self.question})
        return {"id": hashlib.sha256(f"{self.key}\0{self.answer}".encode()).hexdigest()[:16],
                "prompt": prompt, "question": self.question, "answer": self.answer,
                "solution": self.solution, "origin": self.origin, "metadata": self.metadata}


@dataclass
class Reject:
    split: str
    origin: str
    reason: str
    detail: str
    raw: str


# -- per row ----------------------------------------------------------------------------


def parse_split(rows: list[RawRow], split: str, cfg: DataConfig, rejects: list[Reject]) -> list[Example]:
    _check_columns(rows, cfg)
    examples = []
    for row in rows:
        example, reason, detail = _parse_row(row, cfg)
        if example is None:
            rejects.append(Reject(split, row.origin, reason, detail, _raw(row)))
        else:
            examples.append(example)
    return examples


def _check_columns(rows: list[RawRow], cfg: DataConfig) -> None:
    """A column missing from every row is a config mistake, not a bad row: stop and say so."""
    if not rows:
        return
    present = set().union(*(row.values.keys() for row in rows[:1000]))
    for key, column in (("question_column", cfg.question_column), ("answer_column", cfg.answer_column)):
        if column not in present and not any(column in row.values for row in rows):
            where = rows[0].origin.rsplit(":", 1)[0]
            raise DataError(f"data.{key}: column {column!r} is not in {where}; its columns are "
                            f"{', '.join(sorted(present))}. Set data.{key} to the right one.")


def _parse_row(row: RawRow, cfg: DataConfig) -> tuple[Example | None, str, str]:
    question, reason, detail = _text_value(row.values, cfg.question_column, "question")
    if question is None:
        return None, reason, detail
    answer = row.values.get(cfg.answer_column)
    if cfg.answer_type == "number" and cfg.answer_format == "plain" and _is_number(answer):
        # a number column (Parquet, Arrow, JSON) holds the number itself
        if not _is_finite(answer):
            return None, "unparsable_answer", f"column {cfg.answer_column!r} holds {answer}, not a finite number"
        answer_text = _number_text(answer)
    else:
        answer_text, reason, detail = _text_value(row.values, cfg.answer_column, "answer")
        if answer_text is None:
            return None, reason, detail
    solution = None
    final = answer_text
    if cfg.answer_format == "gsm8k":
        if GSM8K_MARKER in question:
            return None, "question_contains_solution", f"the question contains {GSM8K_MARKER!r}"
        parts = split_gsm8k(answer_text)
        if parts is None or not parts[1]:
            return None, "no_final_answer", f"no '{GSM8K_MARKER} <final answer>' in the answer"
        solution, final = parts
        solution = solution or None
    if "\n" in final or len(final) > cfg.max_answer_chars:
        return None, "answer_gives_away_reasoning", (
            f"final answer of {len(final)} characters{' over several lines' if chr(10) in final else ''} "
            f"(data.max_answer_chars is {cfg.max_answer_chars})")
    if cfg.answer_type == "number" and "=" in final:
        # '3 + 4 = 7' is a computation, not a final number: the working leaked into the answer
        return None, "answer_gives_away_reasoning", f"final answer {final!r} is a computation"
    if cfg.answer_type == "number":
        number = normalize_number(final)
        if number is None:
            return None, "unparsable_answer", f"{final!r} is not one number (data.answer_type is number)"
        final = number
    metadata = row.values.get("metadata")
    return Example(question, final, solution, row.origin, metadata if isinstance(metadata, str) else None,
                   normalize_question(question), _raw(row)), "", ""


# C0 control characters other than tab, line feed and carriage return, and DEL. U+0085, U+2028 and
# U+2029 are line breaks, which text may hold, and are kept.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _text_value(values: dict[str, Any], column: str, kind: str) -> tuple[str | None, str, str]:
    """The column's text, less surrounding whitespace; or (None, reason, detail). Only a string is
    text: a number, a list or bytes is rejected as it is, never turned into its repr."""
    value = values.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f"missing_{kind}", f"column {column!r} is missing or empty"
    if not isinstance(value, str):
        return None, "wrong_type", f"column {column!r} holds {_describe(value)}, not text"
    if m := _CONTROL.search(value):
        return None, "control_character", (f"column {column!r} holds the control character "
                                           f"U+{ord(m.group()):04X} at character {m.start() + 1}")
    return value.strip(), "", ""


def _describe(value: Any) -> str:
    """'a dict {'a': 1}', 'an int 5', 'a bytes b'q'': the type and the start of the value, for a detail."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN (a missing value, as pandas writes it?)"
    kind = type(value).__name__
    text = shown(repr(value))
    if len(text) > 60:
        text = text[:60] + "..."
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} {text}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _is_finite(value: int | float | Decimal) -> bool:
    if isinstance(value, int):  # math.isfinite(10**400) would overflow converting to float
        return True
    return value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)


def _number_text(value: int | float | Decimal) -> str:
    """The number in digits for normalize_number: 1e+20 -> '100000000000000000000'; a float is read from
    its repr, so 0.1 stays '0.1' and not its binary expansion."""
    if isinstance(value, int):
        return str(value)
    return format(Decimal(repr(value)) if isinstance(value, float) else value, "f")


def _raw(row: RawRow) -> str:
    """The row as written, for the rejects: its line where the format has lines, else its values as JSON."""
    return shown(row.raw if row.raw is not None else json.dumps(row.values, default=str, ensure_ascii=False))


# Marks that end a sentence or a clause, where a word ends: 'How many?' and 'how many' are one question.
# Inside a word they stay: '1.5', '2,000' and 'e.g' keep their points and commas.
_SENTENCE_MARKS = re.compile(r"[.,;:?\u3002\uff0c\uff1b\uff1a\uff1f]+(?=\s|$)")


def normalize_question(text: str) -> str:
    """The dedupe and overlap key: case, spacing, Unicode composition and the marks that end a sentence
    do not make two questions different. Everything else does: signs, operators, brackets, digits,
    '!' (a factorial), superscripts; so '7 + 3', '7 - 3' and '-7 + 3' are three questions."""
    text = unicodedata.normalize("NFC", text).lower()
    return " ".join(_SENTENCE_MARKS.sub("", text).split())


# -- across rows ------------------------------------------------------------------------


def dedupe(examples: list[Example], split: str, rejects: list[Reject]) -> list[Example]:
    by_key: dict[str, list[Example]] = {}
    for ex in examples:
        by_key.setdefault(ex.key, []).append(ex)
    kept = []
    for ex in examples:
        group = by_key[ex.key]
        if len({g.answer for g in group}) > 1:
            answers = ", ".join(sorted({repr(g.answer) for g in group}))
            rejects.append(Reject(split, ex.origin, "conflicting_duplicate",
                                  f"{len(group)} copies with answers {answers}", ex.raw))
        elif group[0] is not ex:
            rejects.append(Reject(split, ex.origin, "duplicate", f"same question as {group[0].origin}",
                                  ex.raw))
        else:
            kept.append(ex)
    return kept


def seeded_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(examples) * fraction)) if len(examples) > 1 else 0
    heldout_idx = set(order[:n_heldout])
    train = [ex for i, ex in enumerate(examples) if i not in heldout_idx]
    heldout = [ex for i, ex in enumerate(examples) if i in heldout_idx]
    return train, heldout


def drop_overlap(train: list[Example], heldout: list[Example], rejects: list[Reject]) -> list[Example]:
    heldout_origin = {ex.key: ex.origin for ex in heldout}
    kept = []
    for ex in train:
        if ex.key in heldout_origin:
            rejects.append(Reject("train", ex.origin, "overlaps_heldout",
                                  f"same question as held-out {heldout_origin[ex.key]}", ex.raw))
        else:
            kept.append(ex)
    return kept


def limit_rows(examples: list[Example], split: str, limit: int | None, key: str,
           rejects: list[Reject]) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    for ex in examples[limit:]:
        rejects.append(Reject(split, ex.origin, "over_max_rows", f"{key} is {limit}; the split was full", ex.raw))
    return examples[:limit]
