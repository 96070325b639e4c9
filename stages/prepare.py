"""Data prep: questions with verifiable answers -> train / held-out Parquet + a manifest.

    load -> map columns -> extract the final answer -> build the prompt -> dedupe
         -> split train / held-out -> drop train rows seen in held-out -> write

Every row that does not make it into a split is written to rejects.parquet with its reason
and origin (file:line): rows in = rows out + rejects, in the manifest and in the files. A kept
question or answer is the one in the file, less surrounding whitespace (and, for
answer_type number, written in one form by normalize_number); a value that is not text is
rejected, never turned into text with str(). The output folder is named by a hash of the
input content, the config and this stage's version, so running again on the same inputs
does nothing; a finished folder is published by one rename, under a lock, so two runs that
race publish it once and both return it. The per-row checks and their reject reasons are in
grpoflow/prep_rows.py; the reasons are explained to the user here, in REJECT_REASONS.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from grpoflow.atomic import process_alive, remove_stale, replace_folder, temporary_name
from grpoflow.clock import now_iso
from grpoflow.config import DataConfig
from grpoflow.hashing import cache_key, file_sha256
from grpoflow.prep_rows import (DataError, Example, Reject, dedupe, drop_overlap, limit_rows, parse_split,
                                seeded_split)
from grpoflow.sources import LoadedSource, load_source

log = logging.getLogger("grpoflow.prepare")

# Bump when this stage writes different rows for the same inputs: old caches stop matching.
PREP_VERSION = 2

REJECT_REASONS = {
    "unreadable": "the file's parser could not read the row (bad JSON, a key given twice in one object, "
                  "wrong CSV column count, a stray or unclosed CSV quote)",
    "invalid_encoding": "the row holds bytes that are not UTF-8 (a Latin-1 or cp1252 file, a cut character) "
                        "or a lone surrogate escape such as \\ud800: it is not text; save the file as UTF-8",
    "wrong_type": "the question or answer is not text (a number, true/false, a list, an object, bytes, NaN); "
                  "for answer_type number with answer_format plain, a finite number is an answer too",
    "control_character": "the question or answer holds a control character (NUL, ESC, ...; tab and line "
                         "breaks are text): a binary or damaged value, and NUL cuts a prompt short in C tools",
    "missing_question": "no question, or an empty one",
    "missing_answer": "no answer, or an empty one",
    "no_final_answer": "answer_format is gsm8k but the answer has no '#### <final answer>'",
    "unparsable_answer": "answer_type is number but the final answer is not one number "
                         "('2, 3', '1,00', 'five', NaN, Infinity)",
    "answer_gives_away_reasoning": "the final answer spans lines, is longer than data.max_answer_chars, "
                                   "or is a computation ('3 + 4 = 7') where a number was expected",
    "question_contains_solution": "the question holds a '####' final-answer marker",
    "duplicate": "the same question (normalised text) already appeared in this split",
    "conflicting_duplicate": "the same question appears with different answers; no copy is kept",
    "overlaps_heldout": "a train question that is also in the held-out set",
    "over_max_rows": "past data.max_train_rows or data.max_heldout_rows: the split was full",
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

    def as_json(self) -> dict[str, Any]:
        """What `grpoflow prepare` prints and the flow returns."""
        return {"output_dir": self.output_dir, "train": str(self.train_path), "heldout": str(self.heldout_path),
                "rows": {k: v["rows"] for k, v in self.splits.items()}, "rejected": self.rejected,
                "cached": self.cached}

    def write(self, folder: Path) -> None:
        data = asdict(self)
        del data["cached"]
        (folder / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")


def run_prepare(cfg: DataConfig) -> Manifest:
    started = time.perf_counter()
    source = load_source(cfg.source, train_split=cfg.train_split, heldout_split=cfg.heldout_split,
                         subset=cfg.subset, revision=cfg.revision, generator_size=cfg.reasoning_gym.size,
                         generator_options=cfg.reasoning_gym.options,
                         seed=cfg.seed)
    content_hash = _content_hash(cfg, source)
    out = Path(cfg.output_dir) / content_hash[:16]
    if (out / "manifest.json").is_file():
        manifest = Manifest.read(out)
        manifest.cached = True
        log.info("data is up to date: %s (same inputs and config as before)", out)
        return manifest
    log.info("preparing %s", source.description)

    if cfg.train_split not in source.splits:
        raise DataError(f"data.train_split: the source has no split {cfg.train_split!r}; "
                        f"it has {', '.join(source.splits) or 'none'}")
    # The source's split names ("train", "test", ...) become the roles they play here.
    role = {cfg.train_split: "train"}
    if cfg.heldout_split and cfg.heldout_split in source.splits:
        role[cfg.heldout_split] = "heldout"
    if unused := [split for split in source.splits if split not in role]:
        log.info("not using the source's split(s) %s", ", ".join(unused))
    rejects = [Reject(role[u.split], u.origin, u.reason, u.detail, u.raw) for u in source.unreadable
               if u.split in role]
    rows_in = {split: len(source.splits[split]) + sum(u.split == split for u in source.unreadable)
               for split in role}
    train = parse_split(source.splits[cfg.train_split], "train", cfg, rejects)
    if "heldout" in role.values():
        heldout = parse_split(source.splits[cfg.heldout_split], "heldout", cfg, rejects)
        heldout = dedupe(heldout, "heldout", rejects)
        heldout_from = f"the source's {cfg.heldout_split!r} split"
    else:
        heldout = None
    train = dedupe(train, "train", rejects)
    if heldout is None:
        train, heldout = seeded_split(train, cfg.heldout_fraction, cfg.seed)
        heldout_from = f"a seeded split: {cfg.heldout_fraction:.0%} of the train rows (data.seed {cfg.seed})"
        log.info("the source has no %r split: holding out %s", cfg.heldout_split, heldout_from)
    train = drop_overlap(train, heldout, rejects)
    train = limit_rows(train, "train", cfg.max_train_rows, "data.max_train_rows", rejects)
    heldout = limit_rows(heldout, "heldout", cfg.max_heldout_rows, "data.max_heldout_rows", rejects)
    if not train or not heldout:
        raise DataError(_nothing_left_message(cfg, rows_in, rejects, len(train), len(heldout)))
    assert sum(rows_in.values()) == len(train) + len(heldout) + len(rejects), "a row was lost"

    _remove_dead_runs_tmp(out.parent)
    tmp = temporary_name(out)  # beside out; published by _publish, under a lock
    tmp.mkdir(parents=True)
    files = {"train": "train.parquet", "heldout": "heldout.parquet", "rejects": "rejects.parquet"}
    splits = {
        "train": _write_rows(tmp / files["train"], train, cfg.system_prompt),
        "heldout": _write_rows(tmp / files["heldout"], heldout, cfg.system_prompt),
    }
    for split in splits:  # rows cut by a row limit; they are in rejects.parquet as over_max_rows
        splits[split]["limited"] = sum(r.split == split and r.reason == "over_max_rows" for r in rejects)
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
        created_at=now_iso(),
        seconds=round(time.perf_counter() - started, 2),
        files=files,
    )
    manifest.write(tmp)
    _plot_lengths(tmp / "lengths.png", train, heldout)
    if (published := _publish(tmp, out)) is not None:
        log.info("another run published the same data first: %s", out)
        if any(published.splits[s]["sha256"] != splits[s]["sha256"] for s in splits):
            log.warning("%s: its files differ from the ones this run wrote for the same inputs and config "
                        "(another pyarrow version?); keeping the published ones", out)
        return published
    log.info("wrote %d train and %d held-out rows to %s; %d rejected (%s)", len(train), len(heldout), out,
             len(rejects), ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())) or "none")
    return manifest


def _content_hash(cfg: DataConfig, source: LoadedSource) -> str:
    return cache_key({"prep_version": PREP_VERSION, "source": source.fingerprint,
                      "config": cfg.model_dump(mode="json", exclude={"output_dir"})})


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
    elif reasons.get("wrong_type"):
        hint = (f" The columns {cfg.question_column!r} / {cfg.answer_column!r} do not hold text: check "
                "data.question_column and data.answer_column (number answers need data.answer_type: number "
                "and data.answer_format: plain).")
    elif reasons.get("invalid_encoding"):
        hint = " The file is not UTF-8: save it as UTF-8."
    return (f"data.source {cfg.source}: {n_train} train and {n_heldout} held-out rows left of "
            f"{sum(rows_in.values())} read ({top}).{hint}")


# -- publishing -------------------------------------------------------------------------


@contextmanager
def _publish_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the output folder itself (flock on its descriptor: no lock file is left)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _publish(tmp: Path, out: Path) -> Manifest | None:
    """Move the finished `tmp` to `out` in one rename. None when this run published it; the manifest
    already there when another run published the same content first (its name is the hash of the
    inputs, the config and PREP_VERSION, so a finished folder of that name holds these rows)."""
    with _publish_lock(out.parent):
        if (out / "manifest.json").is_file():
            shutil.rmtree(tmp)
            manifest = Manifest.read(out)
            manifest.cached = True
            return manifest
        replace_folder(tmp, out)  # over a folder without manifest.json: a run cut short before this was atomic
    return None


def _remove_dead_runs_tmp(folder: Path) -> None:
    """Remove the temporary folders of runs on this host that stopped before they published (a live
    run's, or another host's, are left alone), and those PREP_VERSION 1 named <hash>.tmp-<pid>."""
    for name in remove_stale(folder):
        log.info("removed %s, left by a run that stopped before it published", folder / name)
    for tmp in folder.glob("*.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            log.info("removing %s, left by a run that stopped before it published", tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # two runs may both be removing it


# -- writing ----------------------------------------------------------------------------


def _write_rows(path: Path, examples: list[Example], system_prompt: str) -> dict[str, Any]:
    table = pa.Table.from_pylist([ex.record(system_prompt) for ex in examples], schema=ROW_SCHEMA)
    pq.write_table(table, path)
    lengths = sorted(len(ex.question) for ex in examples)
    return {"rows": len(examples), "file": path.name, "sha256": file_sha256(path),
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
