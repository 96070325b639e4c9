"""Data prep: questions with verifiable answers -> train / held-out Parquet + a manifest.

    load -> map columns -> extract the final answer -> build the prompt -> dedupe
         -> split train / held-out -> drop train rows seen in held-out -> write

Every row that does not make it into a split is written to rejects.parquet with its reason
and origin (file:line). The output folder is named by a hash of the input content, the
config and this stage's version, so running again on the same inputs does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grpoflow.answers import GSM8K_MARKER, normalize_number, split_gsm8k
from grpoflow.config import DataConfig
from grpoflow.sources import LoadedSource, RawRow, load_source

log = logging.getLogger("grpoflow.prepare")

# Bump when this stage writes different rows for the same inputs: old caches stop matching.
PREP_VERSION = 1

REJECT_REASONS = {
    "unreadable": "the file's parser could not read the row (bad JSON, wrong CSV column count)",
    "missing_question": "no question, or an empty one",
    "missing_answer": "no answer, or an empty one",
    "no_final_answer": "answer_format is gsm8k but the answer has no '#### <final answer>'",
    "unparsable_answer": "answer_type is number but the final answer is not a number",
    "answer_gives_away_reasoning": "the final answer spans lines, is longer than data.max_answer_chars, "
                                   "or is a computation ('3 + 4 = 7') where a number was expected",
    "question_contains_solution": "the question holds a '####' final-answer marker",
    "duplicate": "the same question (normalised text) already appeared in this split",
    "conflicting_duplicate": "the same question appears with different answers; no copy is kept",
    "overlaps_heldout": "a train question that is also in the held-out set",
}

ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("solution", pa.string()),
    ("origin", pa.string()),
    ("metadata", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("split", pa.string()),
    ("origin", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("raw", pa.string()),
])


class DataError(ValueError):
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


@dataclass
class Manifest:
    content_hash: str
    output_dir: str
    source: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    rejected: dict[str, Any]
    heldout_from: str
    config: dict[str, Any]
    created_at: str
    seconds: float
    prep_version: int = PREP_VERSION
    cached: bool = False
    files: dict[str, str] = field(default_factory=dict)

    @property
    def train_path(self) -> Path:
        return Path(self.output_dir) / self.files["train"]

    @property
    def heldout_path(self) -> Path:
        return Path(self.output_dir) / self.files["heldout"]

    @property
    def rejects_path(self) -> Path:
        return Path(self.output_dir) / self.files["rejects"]

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        data = json.loads((folder / "manifest.json").read_text())
        data["output_dir"] = str(folder)
        return cls(**data)

    def write(self, folder: Path) -> None:
        data = asdict(self)
        del data["cached"]
        (folder / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")


def run_prepare(cfg: DataConfig) -> Manifest:
    started = time.perf_counter()
    source = load_source(cfg.source, train_split=cfg.train_split, heldout_split=cfg.heldout_split,
                         subset=cfg.subset, revision=cfg.revision, generator_size=cfg.reasoning_gym.size,
                         seed=cfg.seed)
    content_hash = _content_hash(cfg, source)
    out = Path(cfg.output_dir) / content_hash[:16]
    if (out / "manifest.json").is_file():
        manifest = Manifest.read(out)
        manifest.cached = True
        log.info("data is up to date: %s (same inputs and config as before)", out)
        return manifest
    log.info("preparing %s", source.description)

    rejects = [Reject(u.split, u.origin, "unreadable", u.detail, u.raw) for u in source.unreadable]
    if cfg.train_split not in source.splits:
        raise DataError(f"data.train_split: the source has no split {cfg.train_split!r}; "
                        f"it has {', '.join(source.splits) or 'none'}")
    rows_in = {split: len(rows) for split, rows in source.splits.items()}
    train = _parse_split(source.splits[cfg.train_split], "train", cfg, rejects)
    if cfg.heldout_split and cfg.heldout_split in source.splits:
        heldout = _parse_split(source.splits[cfg.heldout_split], "heldout", cfg, rejects)
        heldout = _dedupe(heldout, "heldout", rejects)
        heldout_from = f"the source's {cfg.heldout_split!r} split"
    else:
        heldout = None
    train = _dedupe(train, "train", rejects)
    if heldout is None:
        train, heldout = _seeded_split(train, cfg.heldout_fraction, cfg.seed)
        heldout_from = f"a seeded split: {cfg.heldout_fraction:.0%} of the train rows (data.seed {cfg.seed})"
        log.info("the source has no %r split: holding out %s", cfg.heldout_split, heldout_from)
    train = _drop_overlap(train, heldout, rejects)
    limited = {"train": _limit(train, cfg.max_train_rows), "heldout": _limit(heldout, cfg.max_heldout_rows)}
    train, heldout = train[: cfg.max_train_rows], heldout[: cfg.max_heldout_rows]
    if not train or not heldout:
        raise DataError(_nothing_left_message(cfg, rows_in, rejects, len(train), len(heldout)))

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {"train": "train.parquet", "heldout": "heldout.parquet", "rejects": "rejects.parquet"}
    splits = {
        "train": _write_rows(tmp / files["train"], train, cfg.system_prompt),
        "heldout": _write_rows(tmp / files["heldout"], heldout, cfg.system_prompt),
    }
    for split in splits:
        splits[split]["limited"] = limited[split]
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in rejects], schema=REJECT_SCHEMA), tmp / files["rejects"])
    by_reason: dict[str, int] = {}
    by_split: dict[str, int] = {}
    for r in rejects:
        by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
        by_split[r.split] = by_split.get(r.split, 0) + 1
    manifest = Manifest(
        content_hash=content_hash,
        output_dir=str(out),
        source={"spec": cfg.source, "kind": source.kind, "description": source.description,
                "fingerprint": source.fingerprint, "rows_in": rows_in, "files": source.files},
        splits=splits,
        rejected={"total": len(rejects), "by_reason": by_reason, "by_split": by_split},
        heldout_from=heldout_from,
        config=cfg.model_dump(mode="json"),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=round(time.perf_counter() - started, 2),
        files=files,
    )
    manifest.write(tmp)
    _plot_lengths(tmp / "lengths.png", train, heldout)
    if out.exists():  # a folder without manifest.json is a leftover of an interrupted run
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("wrote %d train and %d held-out rows to %s; %d rejected (%s)", len(train), len(heldout), out,
             len(rejects), ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())) or "none")
    return manifest


def _content_hash(cfg: DataConfig, source: LoadedSource) -> str:
    key = {"prep_version": PREP_VERSION, "source": source.fingerprint,
           "config": cfg.model_dump(mode="json", exclude={"output_dir"})}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# -- per row ----------------------------------------------------------------------------


def _parse_split(rows: list[RawRow], split: str, cfg: DataConfig, rejects: list[Reject]) -> list[Example]:
    _check_columns(rows, cfg)
    examples = []
    for row in rows:
        example, reason, detail = _parse_row(row, cfg)
        if example is None:
            rejects.append(Reject(split, row.origin, reason, detail, _raw(row.values)))
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
    question = _text(row.values.get(cfg.question_column))
    answer_text = _text(row.values.get(cfg.answer_column))
    if not question:
        return None, "missing_question", f"column {cfg.question_column!r} is missing or empty"
    if not answer_text:
        return None, "missing_answer", f"column {cfg.answer_column!r} is missing or empty"
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
            return None, "unparsable_answer", f"{final!r} is not a number (data.answer_type is number)"
        final = number
    metadata = row.values.get("metadata")
    return Example(question, final, solution, row.origin, metadata if isinstance(metadata, str) else None,
                   normalize_question(question), _raw(row.values)), "", ""


def _text(value: Any) -> str:
    if value is None:
        return ""
    return (value if isinstance(value, str) else str(value)).strip()


def _raw(values: dict[str, Any]) -> str:
    return json.dumps(values, default=str, ensure_ascii=False)


def normalize_question(text: str) -> str:
    """Case, Unicode form, punctuation and spacing do not make two questions different."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text).split())


# -- across rows ------------------------------------------------------------------------


def _dedupe(examples: list[Example], split: str, rejects: list[Reject]) -> list[Example]:
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


def _seeded_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(examples) * fraction)) if len(examples) > 1 else 0
    heldout_idx = set(order[:n_heldout])
    train = [ex for i, ex in enumerate(examples) if i not in heldout_idx]
    heldout = [ex for i, ex in enumerate(examples) if i in heldout_idx]
    return train, heldout


def _drop_overlap(train: list[Example], heldout: list[Example], rejects: list[Reject]) -> list[Example]:
    heldout_origin = {ex.key: ex.origin for ex in heldout}
    kept = []
    for ex in train:
        if ex.key in heldout_origin:
            rejects.append(Reject("train", ex.origin, "overlaps_heldout",
                                  f"same question as held-out {heldout_origin[ex.key]}", ex.raw))
        else:
            kept.append(ex)
    return kept


def _limit(examples: list[Example], limit: int | None) -> int:
    return max(0, len(examples) - limit) if limit is not None else 0


def _nothing_left_message(cfg: DataConfig, rows_in: dict[str, int], rejects: list[Reject],
                          n_train: int, n_heldout: int) -> str:
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    top = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "no rejects"
    hint = ""
    if reasons.get("no_final_answer"):
        hint = " If the answer column holds only the final answer, set data.answer_format: plain."
    elif reasons.get("unparsable_answer"):
        hint = " If answers are not numbers, set data.answer_type: text."
    return (f"data.source {cfg.source}: {n_train} train and {n_heldout} held-out rows left of "
            f"{sum(rows_in.values())} read ({top}).{hint}")


# -- writing ----------------------------------------------------------------------------


def _write_rows(path: Path, examples: list[Example], system_prompt: str) -> dict[str, Any]:
    table = pa.Table.from_pylist([ex.record(system_prompt) for ex in examples], schema=ROW_SCHEMA)
    pq.write_table(table, path)
    lengths = sorted(len(ex.question) for ex in examples)
    return {"rows": len(examples), "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "question_chars": {"p50": lengths[len(lengths) // 2], "p95": lengths[int(len(lengths) * 0.95)],
                               "max": lengths[-1]}}


def _plot_lengths(path: Path, train: list[Example], heldout: list[Example]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, examples in (("train", train), ("held-out", heldout)):
        ax.hist([len(ex.question.split()) for ex in examples], bins=40, alpha=0.6, density=True,
                label=f"{name} ({len(examples):,})")
    ax.set_xlabel("question length (words)")
    ax.set_ylabel("share of rows")
    ax.set_title("Question lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
