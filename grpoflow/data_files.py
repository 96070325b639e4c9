"""One local data file -> rows: JSON, JSON Lines, CSV, Parquet and Arrow, each bad record kept as a reject.

Text files are UTF-8 (a byte-order mark is allowed). A byte that is not UTF-8 rejects the line
or record that holds it, and only that one: the file is decoded with Python's surrogateescape,
which keeps such a byte as one character in U+DC80..U+DCFF, so the row holding it can be found
after parsing. Nothing is decoded with errors="replace" or turned into text with str().
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grpoflow.errors import UserError

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


def read_file(path: Path, data: bytes, split: str) -> tuple[list[RawRow], list[Unreadable]]:
    """The rows of one file (`data`: its bytes), and the records that cannot be rows: those its
    parser could not read, then those holding what the format does not allow (bytes that are not
    UTF-8, a key given twice in one object)."""
    read: list[RawRow] = []
    unreadable: list[Unreadable] = []
    _parse_file(path, data, split, read, unreadable)
    rows = []
    for row in read:
        if problem := _value_problem(row.values):
            reason, detail = problem
            raw = row.raw if row.raw is not None else _dumps(row.values)
            unreadable.append(Unreadable(split, row.origin, shown(raw), detail, reason))
        else:
            rows.append(row)
    return rows, unreadable


def _parse_file(path: Path, data: bytes, split: str, rows: list[RawRow], unreadable: list[Unreadable]) -> None:
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
