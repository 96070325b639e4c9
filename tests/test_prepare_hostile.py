"""Data prep on hostile files (issue #18, section 2): every row is kept exactly as written or rejected
with its reason, file and line; rows in = rows out + rejects, whatever the bytes.

Each case below is one real file (or folder) written with the encoding, types and line breaks it names,
read by run_prepare, and checked row by row: where every row of the file ended up. A row the case does
not list, or one listed twice, fails the case, so nothing can be dropped or duplicated unnoticed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpoflow.config import DataConfig
from grpoflow.normalize import normalize_number
from grpoflow.prep_rows import normalize_question
from grpoflow.sources import SourceError, load_source
from stages.prepare import REJECT_REASONS, DataError, Manifest, run_prepare

REPO = Path(__file__).resolve().parents[1]


# -- reading the outputs back -------------------------------------------------------------------------


def outcomes(manifest: Manifest, root: Path) -> dict[str, Any]:
    """origin (relative to `root`) -> ('kept', question, answer) or ('rejected', reason, detail), checking
    on the way that no origin is in two places and that the manifest's counts are the files' counts."""
    found: dict[str, Any] = {}
    for split, path in (("train", manifest.train_path), ("heldout", manifest.heldout_path)):
        rows = pq.read_table(path).to_pylist()
        assert len(rows) == manifest.splits[split]["rows"]
        for r in rows:
            key = r["origin"].removeprefix(f"{root}/")
            assert key not in found, f"{key} is in two outputs"
            found[key] = ("kept", r["question"], r["answer"])
    rejects = pq.read_table(manifest.rejects_path).to_pylist()
    assert len(rejects) == manifest.rejected["total"]
    for r in rejects:
        assert r["reason"] in REJECT_REASONS
        assert r["split"] in ("train", "heldout")
        key = r["origin"].removeprefix(f"{root}/")
        assert key not in found, f"{key} is in two outputs"
        found[key] = ("rejected", r["reason"], r["detail"])
    kept = manifest.splits["train"]["rows"] + manifest.splits["heldout"]["rows"]
    assert sum(manifest.source["rows_in"].values()) == kept + manifest.rejected["total"]  # in = out + rejects
    return found


@dataclass
class Reject:
    reason: str
    detail: str = ""  # a part of the detail the reject must carry


@dataclass
class Fails:
    error: type[Exception]
    match: str


K1 = ("Anchor one?", "1")
K2 = ("Anchor two?", "2")
A1 = {"question": "Anchor one?", "answer": "1"}
A2 = {"question": "Anchor two?", "answer": "2"}

# A case writes its file under the folder it is given and returns (source, DataConfig keys, expectation). The
# expectation is {origin: (question, answer) kept | Reject(reason, detail)} listing every row of the file,
# or Fails(error, message) for a file that is wrong as a whole, or a function checking the manifest.
CASES: dict[str, Callable[[Path], tuple[Path, dict[str, Any], Any]]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def jsonl(path: Path, *lines: Any, end: bytes = b"\n") -> Path:
    """One line per item: a dict is dumped as JSON (non-ASCII as is), str is UTF-8, bytes as given."""
    encoded = [line if isinstance(line, bytes) else
               (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)).encode() for line in lines]
    path.write_bytes(end.join(encoded) + end)
    return path


def arrow_strings(values: list[bytes]) -> pa.Array:
    """A string array holding exactly these bytes: pyarrow checks UTF-8 when it builds one, not when it reads."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))])


# -- encodings: a bad byte rejects its own row, and only that one ------------------------------------------


@case
def jsonl_latin1_line(d):
    f = jsonl(d / "d.jsonl", A1, '{"question": "Caf\xe9 au lait?", "answer": "3"}'.encode("latin-1"), A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("invalid_encoding", "byte 0xE9"), "d.jsonl:3": K2}


@case
def jsonl_cp1252_quotes(d):
    f = jsonl(d / "d.jsonl", A1, b'{"question": "\x93Quoted\x94 how many?", "answer": "3"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("invalid_encoding", "byte 0x93"), "d.jsonl:3": K2}


@case
def jsonl_cut_multibyte_character(d):
    f = jsonl(d / "d.jsonl", A1, b'{"question": "Costs \xe2\x82", "answer": "3"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("invalid_encoding"), "d.jsonl:3": K2}


@case
def jsonl_overlong_and_surrogate_bytes(d):
    f = jsonl(d / "d.jsonl", A1, b'{"question": "a\xc0\xafb?", "answer": "3"}',
              b'{"question": "c\xed\xa0\x80d?", "answer": "4"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("invalid_encoding"), "d.jsonl:3": Reject("invalid_encoding"),
                   "d.jsonl:4": K2}


@case
def jsonl_escaped_lone_surrogate(d):
    f = jsonl(d / "d.jsonl", A1, '{"question": "half an emoji \\ud83d?", "answer": "3"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("invalid_encoding", "U+D83D"), "d.jsonl:3": K2}


@case
def jsonl_bad_byte_in_an_unused_field(d):
    f = jsonl(d / "d.jsonl", A1, b'{"question": "Fine?", "answer": "3", "note": "\xff"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("invalid_encoding", "0xFF"), "d.jsonl:3": K2}


@case
def json_array_latin1_item(d):
    f = d / "d.json"
    f.write_bytes(b'[{"question": "Anchor one?", "answer": "1"},\n {"question": "Caf\xe9?", "answer": "3"},\n'
                  b' {"question": "Anchor two?", "answer": "2"}]')
    return f, {}, {"d.json:item 1": K1, "d.json:item 2": Reject("invalid_encoding", "0xE9"), "d.json:item 3": K2}


@case
def csv_latin1_row(d):
    f = d / "d.csv"
    f.write_bytes("question,answer\nAnchor one?,1\nCaf\xe9 costs 3?,3\nAnchor two?,2\n".encode("latin-1"))
    return f, {}, {"d.csv:2": K1, "d.csv:3": Reject("invalid_encoding", "0xE9"), "d.csv:4": K2}


@case
def csv_latin1_in_a_multiline_value(d):
    f = d / "d.csv"
    f.write_bytes(b'question,answer\nAnchor one?,1\n"Two\nlines \xe9?",3\nAnchor two?,2\n')
    return f, {}, {"d.csv:2": K1, "d.csv:3": Reject("invalid_encoding"), "d.csv:5": K2}


@case
def csv_latin1_header(d):
    f = d / "d.csv"
    f.write_bytes(b"question,r\xe9ponse\nq?,1\n")
    return f, {"answer_column": "réponse"}, Fails(SourceError, "is not text")


@case
def parquet_string_column_not_utf8(d):
    f = d / "d.parquet"
    pq.write_table(pa.table({"question": arrow_strings([b"Anchor one?", b"Caf\xe9?", b"Anchor two?"]),
                             "answer": ["1", "3", "2"]}), f)
    return f, {}, {"d.parquet:row 1": K1, "d.parquet:row 2": Reject("invalid_encoding", "0xE9"), "d.parquet:row 3": K2}


@case
def arrow_string_column_not_utf8(d):
    f = d / "d.arrow"
    feather.write_feather(pa.table({"question": ["Anchor one?", "Anchor two?", "Q?"],
                                    "answer": arrow_strings([b"1", b"2", b"\xff"])}), f)
    return f, {}, {"d.arrow:row 1": K1, "d.arrow:row 2": K2, "d.arrow:row 3": Reject("invalid_encoding", "0xFF")}


@case
def utf16_jsonl(d):
    f = d / "d.jsonl"
    f.write_bytes(("\ufeff" + json.dumps(A1) + "\n").encode("utf-16-le"))
    return f, {}, Fails(SourceError, "is UTF-16")


@case
def utf16_csv(d):
    f = d / "d.csv"
    f.write_bytes("question,answer\nq?,1\n".encode("utf-16"))
    return f, {}, Fails(SourceError, "is UTF-16")


# -- byte-order marks: accepted in every text format --------------------------------------------------------


@case
def jsonl_utf8_bom(d):
    f = d / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(A1).encode() + b"\n" + json.dumps(A2).encode() + b"\n")
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": K2}


@case
def json_array_utf8_bom(d):
    f = d / "d.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps([A1, A2]).encode())
    return f, {}, {"d.json:item 1": K1, "d.json:item 2": K2}


@case
def csv_utf8_bom_and_crlf(d):
    f = d / "d.csv"
    f.write_bytes(b"\xef\xbb\xbfquestion,answer\r\nAnchor one?,1\r\nAnchor two?,2\r\n")
    return f, {}, {"d.csv:2": K1, "d.csv:3": K2}


@case
def bom_inside_a_question_is_text(d):
    f = jsonl(d / "d.jsonl", {"question": "Zero\ufeffwidth?", "answer": "3"}, A1, A2)
    return f, {}, {"d.jsonl:1": ("Zero\ufeffwidth?", "3"), "d.jsonl:2": K1, "d.jsonl:3": K2}


# -- line breaks: a JSON line ends at \n only; CSV keeps quoted line breaks as written ------------------------


@case
def jsonl_unicode_line_separators_in_strings(d):
    rows = [{"question": f"Line {i}{ch}break?", "answer": str(i)} for i, ch in enumerate("\u2028\u2029\u0085")]
    f = jsonl(d / "d.jsonl", *rows, A1, A2)
    return f, {}, {"d.jsonl:1": ("Line 0\u2028break?", "0"), "d.jsonl:2": ("Line 1\u2029break?", "1"),
                   "d.jsonl:3": ("Line 2\u0085break?", "2"), "d.jsonl:4": K1, "d.jsonl:5": K2}


@case
def jsonl_raw_form_feed_and_group_separator(d):
    # splitlines() splits at \x0c and \x1d too; JSON does not allow them raw inside a string
    f = jsonl(d / "d.jsonl", A1, '{"question": "a\x0cb", "answer": "3"}', '{"question": "c\x1dd", "answer": "4"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("unreadable", "invalid JSON"),
                   "d.jsonl:3": Reject("unreadable", "invalid JSON"), "d.jsonl:4": K2}


@case
def jsonl_crlf(d):
    f = jsonl(d / "d.jsonl", A1, {"question": "Third?", "answer": "3"}, A2, end=b"\r\n")
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": ("Third?", "3"), "d.jsonl:3": K2}


@case
def jsonl_cr_only_line_ends(d):  # old Mac line ends: no "\n" in the whole file
    f = d / "d.jsonl"
    f.write_bytes(json.dumps(A1).encode() + b"\r" + json.dumps(A2).encode() + b"\r")
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": K2}


@case
def jsonl_cr_as_whitespace_inside_a_line(d):  # where "\n" ends lines, a raw "\r" between tokens is whitespace
    f = jsonl(d / "d.jsonl", A1, b'{"question": "Third?",\r "answer": "3"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": ("Third?", "3"), "d.jsonl:3": K2}


@case
def jsonl_empty_and_blank_lines(d):
    f = jsonl(d / "d.jsonl", "", A1, "   ", "\t", "", A2, "")
    return f, {}, {"d.jsonl:2": K1, "d.jsonl:6": K2}


@case
def jsonl_no_final_newline(d):
    f = d / "d.jsonl"
    f.write_text(json.dumps(A1) + "\n" + json.dumps(A2))
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": K2}


@case
def jsonl_very_long_line(d):
    long_q = "How many? " + "x" * 5_000_000
    f = jsonl(d / "d.jsonl", {"question": long_q, "answer": "3"}, A1, A2)
    return f, {}, {"d.jsonl:1": (long_q, "3"), "d.jsonl:2": K1, "d.jsonl:3": K2}


@case
def jsonl_deep_nesting(d):
    f = jsonl(d / "d.jsonl", A1, '{"question": "q?", "answer": "3", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("unreadable", "nested deeper"), "d.jsonl:3": K2}


@case
def jsonl_duplicate_keys(d):
    f = jsonl(d / "d.jsonl", A1, '{"question": "First?", "question": "Second?", "answer": "3"}',
              '{"question": "q?", "answer": "3", "meta": {"a": 1, "a": 2}}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("unreadable", "'question' appears twice"),
                   "d.jsonl:3": Reject("unreadable", "'a' appears twice"), "d.jsonl:4": K2}


@case
def jsonl_not_objects(d):
    f = jsonl(d / "d.jsonl", A1, "[1, 2]", '"text"', "5", "null", A2)
    not_objects = {f"d.jsonl:{n}": Reject("unreadable", "expected a JSON object") for n in (2, 3, 4, 5)}
    return f, {}, {"d.jsonl:1": K1, **not_objects, "d.jsonl:6": K2}


# -- control characters ------------------------------------------------------------------------------------


@case
def jsonl_nul_byte_raw_and_escaped(d):
    f = jsonl(d / "d.jsonl", A1, b'{"question": "a\x00b?", "answer": "3"}', '{"question": "c\\u0000d?", "answer": "3"}',
              '{"question": "Red \\u001b[31mtext?", "answer": "4"}', '{"question": "e?", "answer": "5\\u0007"}', A2)
    return f, {}, {"d.jsonl:1": K1, "d.jsonl:2": Reject("unreadable", "Invalid control character"),
                   "d.jsonl:3": Reject("control_character", "U+0000"),
                   "d.jsonl:4": Reject("control_character", "U+001B"),
                   "d.jsonl:5": Reject("control_character", "U+0007"), "d.jsonl:6": K2}


@case
def jsonl_tabs_and_newlines_are_text(d):
    f = jsonl(d / "d.jsonl", {"question": "Col\tumn\nand line\r\nbreaks?", "answer": "3"}, A1, A2)
    return f, {}, {"d.jsonl:1": ("Col\tumn\nand line\r\nbreaks?", "3"), "d.jsonl:2": K1, "d.jsonl:3": K2}


@case
def csv_nul_in_a_value(d):
    f = d / "d.csv"
    f.write_bytes(b"question,answer\nAnchor one?,1\na\x00b?,3\nAnchor two?,2\n")
    return f, {}, {"d.csv:2": K1, "d.csv:3": Reject("control_character", "U+0000"), "d.csv:4": K2}


# -- value types: text is text; nothing becomes its repr --------------------------------------------------------


@case
def jsonl_questions_of_every_type(d):
    qs = [{"a": 1}, ["What?"], 5, 2.5, True, "NaN", None, "  "]
    lines = [A1] + [f'{{"question": {json.dumps(q) if q != "NaN" else "NaN"}, "answer": "3"}}' for q in qs] + [A2]
    f = jsonl(d / "d.jsonl", *lines)
    expect = {"d.jsonl:1": K1, "d.jsonl:10": K2}
    for n, reason in enumerate(["wrong_type"] * 6 + ["missing_question"] * 2, start=2):
        expect[f"d.jsonl:{n}"] = Reject(reason)
    expect["d.jsonl:2"] = Reject("wrong_type", "a dict {'a': 1}")
    expect["d.jsonl:7"] = Reject("wrong_type", "NaN")
    return f, {}, expect


@case
def jsonl_mixed_answer_types_number(d):
    answers = ['"3"', "3", "3.0", "0.1", "1e20", "true", "[3]", '{"v": 3}', "null", "NaN", "Infinity", "-Infinity",
               "1e400", '"NaN"', '"Infinity"', '"1,080"', '"2, 3"', '"1,00"', '"12,34"', '"$-5"', '"  7  "']
    lines = [A1, A2] + [f'{{"question": "Q{i}?", "answer": {a}}}' for i, a in enumerate(answers)]
    f = jsonl(d / "d.jsonl", *lines)
    outcome = ["3", "3", "3", "0.1", "100000000000000000000", Reject("wrong_type", "a bool True"),
               Reject("wrong_type", "a list"), Reject("wrong_type", "a dict"), Reject("missing_answer"),
               Reject("unparsable_answer", "nan"), Reject("unparsable_answer", "inf"),
               Reject("unparsable_answer", "inf"), Reject("unparsable_answer", "inf"), Reject("unparsable_answer"),
               Reject("unparsable_answer"), "1080", Reject("unparsable_answer", "'2, 3'"), Reject("unparsable_answer"),
               Reject("unparsable_answer"), "-5", "7"]
    expect = {"d.jsonl:1": K1, "d.jsonl:2": K2}
    for i, o in enumerate(outcome):
        expect[f"d.jsonl:{i + 3}"] = o if isinstance(o, Reject) else (f"Q{i}?", o)
    return f, {}, expect


@case
def jsonl_number_answers_for_text_and_gsm8k(d):
    f = jsonl(d / "d.jsonl", A1, A2, {"question": "Int?", "answer": 7}, {"question": "Float?", "answer": 7.5})
    expect = {"d.jsonl:1": K1, "d.jsonl:2": K2, "d.jsonl:3": Reject("wrong_type", "an int 7"),
              "d.jsonl:4": Reject("wrong_type", "a float 7.5")}
    return f, {"answer_type": "text"}, expect


@case
def jsonl_number_answer_with_gsm8k_format(d):
    f = jsonl(d / "d.jsonl", {"question": "Anchor one?", "answer": "w\n#### 1"},
              {"question": "Anchor two?", "answer": "w\n#### 2"}, {"question": "Int?", "answer": 7})
    expect = {"d.jsonl:1": K1, "d.jsonl:2": K2, "d.jsonl:3": Reject("wrong_type", "an int 7")}
    return f, {"answer_format": "gsm8k"}, expect


@case
def parquet_shard_of_the_wrong_types(d):
    # a Hub layout whose second shard was written with other column types: its rows are rejected, not cast
    folder = d / "data"
    folder.mkdir()
    pq.write_table(pa.table({"question": ["Anchor one?", "Anchor two?"], "answer": ["1", "2"]}),
                   folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"question": pa.array([b"Bytes?", None], pa.binary()), "answer": ["3", "4"]}),
                   folder / "train-00001-of-00002.parquet")
    expect = {"data/train-00000-of-00002.parquet:row 1": K1, "data/train-00000-of-00002.parquet:row 2": K2,
              "data/train-00001-of-00002.parquet:row 1": Reject("wrong_type", "a bytes b'Bytes?'"),
              "data/train-00001-of-00002.parquet:row 2": Reject("missing_question")}
    return folder, {}, expect


@pytest.mark.parametrize("column", [
    pa.array([1, 2]), pa.array([1.5, float("nan")]), pa.array([True, False]),
    pa.array([{"t": "What?"}, {"t": "Why?"}]), pa.array([["What?"], ["Why?"]]),
])
def test_a_question_column_of_another_type_is_rejected_not_cast(tmp_path, column):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": column, "answer": ["1", "2"]}), f)
    with pytest.raises(DataError, match=r"left of 2 read \(wrong_type: 2\)\. The columns 'question' / 'answer' "
                                        "do not hold text"):
        run_prepare(DataConfig(source=str(f), output_dir=tmp_path / "out", answer_format="plain"))


@case
def parquet_number_answer_columns(d):
    f = d / "d.parquet"
    pq.write_table(pa.table({"question": ["Anchor one?", "Anchor two?", "A?", "B?", "C?", "D?", "E?"],
                             "answer": pa.array([1.0, 2.0, 1.5, float("nan"), float("inf"), 1e20, None])}), f)
    g = d / "e.parquet"
    pq.write_table(pa.table({"question": ["F?", "G?"],
                             "answer": pa.array([Decimal("12.50"), Decimal("-3")], pa.decimal128(6, 2))}), g)
    folder = d / "both"
    folder.mkdir()
    f.rename(folder / "train-0.parquet")
    g.rename(folder / "train-1.parquet")
    p, q = "both/train-0.parquet:row", "both/train-1.parquet:row"
    return folder, {}, {f"{p} 1": K1, f"{p} 2": K2, f"{p} 3": ("A?", "1.5"),
                        f"{p} 4": Reject("unparsable_answer", "nan"), f"{p} 5": Reject("unparsable_answer", "inf"),
                        f"{p} 6": ("D?", "100000000000000000000"), f"{p} 7": Reject("missing_answer"),
                        f"{q} 1": ("F?", "12.5"), f"{q} 2": ("G?", "-3")}


@case
def parquet_dictionary_and_large_strings(d):
    f = d / "d.parquet"
    pq.write_table(pa.table({"question": pa.array(["Anchor one?", "Anchor two?"], pa.large_string()),
                             "answer": pa.array(["1", "2"]).dictionary_encode()}), f)
    return f, {}, {"d.parquet:row 1": K1, "d.parquet:row 2": K2}


@case
def parquet_duplicate_column_names(d):
    f = d / "d.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["q?"]), pa.array(["1"]), pa.array(["2"])],
                                        names=["question", "answer", "answer"]), f)
    return f, {}, Fails(SourceError, "names the column 'answer' twice")


# -- CSV: every value is the text in the file --------------------------------------------------------------


@case
def csv_text_answers_are_not_type_inferred(d):
    f = d / "d.csv"
    f.write_text("question,answer\nZip of Boston?,02100\nNot available?,NA\nNull?,null\nNaN?,nan\nTrue?,TRUE\n"
                 "Date?,2024-01-02\nEmpty?,\nSpaces?,  padded  \n")
    return f, {"answer_type": "text"}, {
        "d.csv:2": ("Zip of Boston?", "02100"), "d.csv:3": ("Not available?", "NA"), "d.csv:4": ("Null?", "null"),
        "d.csv:5": ("NaN?", "nan"), "d.csv:6": ("True?", "TRUE"), "d.csv:7": ("Date?", "2024-01-02"),
        "d.csv:8": Reject("missing_answer"), "d.csv:9": ("Spaces?", "padded")}


@case
def csv_number_answers(d):
    f = d / "d.csv"
    f.write_text('question,answer\nA?,"1,080"\nB?,"2, 3"\nC?,1e5\nD?,0x10\nE?,02100\nF?,$18.50\nG?,NaN\nH?,-0\n')
    return f, {}, {"d.csv:2": ("A?", "1080"), "d.csv:3": Reject("unparsable_answer", "'2, 3'"),
                   "d.csv:4": Reject("unparsable_answer"), "d.csv:5": Reject("unparsable_answer"),
                   "d.csv:6": ("E?", "2100"), "d.csv:7": ("F?", "18.5"), "d.csv:8": Reject("unparsable_answer"),
                   "d.csv:9": ("H?", "0")}


@case
def csv_quoted_line_breaks_crlf_and_unicode_separators(d):
    f = d / "d.csv"
    f.write_bytes('question,answer\r\n"Two\r\nlines?",3\r\n"Sep\u2028and\u0085next?",4\r\nAnchor one?,1\r\n'
                  "Anchor two?,2\r\n".encode())
    return f, {}, {"d.csv:2": ("Two\r\nlines?", "3"), "d.csv:4": ("Sep\u2028and\u0085next?", "4"), "d.csv:5": K1,
                   "d.csv:6": K2}


@case
def csv_stray_quotes_and_column_counts(d):
    f = d / "d.csv"
    f.write_text('question,answer\nAnchor one?,1\n"bad"x,3\nextra?,1,2\nshort?\n   \nIn"side?,5\n\n\nAnchor two?,2\n')
    return f, {}, {"d.csv:2": K1, "d.csv:3": Reject("unreadable", "not CSV"),
                   "d.csv:4": Reject("unreadable", "expected 2 columns, got 3"),
                   "d.csv:5": Reject("unreadable", "expected 2 columns, got 1"),
                   "d.csv:6": Reject("unreadable", "expected 2 columns, got 1"),
                   "d.csv:7": ('In"side?', "5"), "d.csv:10": K2}


@case
def csv_unclosed_quote(d):
    f = d / "d.csv"
    f.write_text('question,answer\nAnchor one?,1\nAnchor two?,2\n"Never closed?,3\nlast?,4\n')
    return f, {}, {"d.csv:2": K1, "d.csv:3": K2, "d.csv:4": Reject("unreadable", "opened on line 4 is never closed")}


@case
def csv_bare_carriage_return(d):
    # "\r" ends a CSV line, as in every CSV reader: unquoted it splits the row (and the half without an
    # answer is rejected); quoted it is part of the value
    f = d / "d.csv"
    f.write_bytes(b'question,answer\nAnchor one?,1\nCarriage\rreturn?,3\n"Quoted\rreturn?",4\nAnchor two?,2\n')
    return f, {}, {"d.csv:2": K1, "d.csv:3": Reject("unreadable", "expected 2 columns, got 1"),
                   "d.csv:4": ("return?", "3"), "d.csv:5": ("Quoted\rreturn?", "4"), "d.csv:7": K2}


@case
def csv_cr_only_line_ends(d):
    f = d / "d.csv"
    f.write_bytes(b"question,answer\rAnchor one?,1\rAnchor two?,2\r")
    return f, {}, {"d.csv:2": K1, "d.csv:3": K2}


@case
def csv_very_long_value(d):
    long_q = "How many? " + "y" * 300_000  # past the csv module's default field limit (128 KiB)
    f = d / "d.csv"
    f.write_text(f"question,answer\n{long_q},3\nAnchor one?,1\nAnchor two?,2\n")
    return f, {}, {"d.csv:2": (long_q, "3"), "d.csv:3": K1, "d.csv:4": K2}


@case
def csv_duplicate_header(d):
    f = d / "d.csv"
    f.write_text("question,answer,answer\nq?,1,2\n")
    return f, {}, Fails(SourceError, "names the column 'answer' twice")


@case
def csv_semicolons(d):
    f = d / "d.csv"
    f.write_text("question;answer\nq?;1\n")
    return f, {}, Fails(DataError, "column 'question' is not in")


@case
def csv_header_only(d):
    f = d / "d.csv"
    f.write_text("question,answer\n")
    return f, {}, Fails(DataError, "left of 0 read")


@case
def empty_jsonl(d):
    f = d / "d.jsonl"
    f.write_bytes(b"")
    return f, {}, Fails(DataError, "left of 0 read")


# -- dedupe: case and spacing merge, operators and signs do not ------------------------------------------


@case
def jsonl_arithmetic_questions(d):
    qs = [("7 + 3", "10"), ("7 - 3", "4"), ("-7 + 3", "-4"), ("7 * 3", "21"), ("(7 + 3) * 2", "20"),
          ("7 + 3 * 2", "13"), ("7 + 3?", "10"), ("7  +  3", "10"), ("What is 1.5 + 2?", "3.5"),
          ("What is 15 + 2?", "17"), ("5!", "120"), ("5", "5"), ("x² = 4, x > 0", "2"), ("x2 = 4, x > 0", "2"),
          ("SUM 2,000 and 1", "2001"), ("sum 2000 and 1", "2001")]
    f = jsonl(d / "d.jsonl", *[{"question": q, "answer": a} for q, a in qs])
    expect = {f"d.jsonl:{i}": (q, a) for i, (q, a) in enumerate(qs, start=1)}
    expect["d.jsonl:7"] = Reject("duplicate", "same question as")  # '7 + 3?'
    expect["d.jsonl:8"] = Reject("duplicate", "same question as")  # '7  +  3'
    return f, {}, expect


@case
def max_rows_are_rejects(d):
    f = jsonl(d / "d.jsonl", *[{"question": f"Q{i}?", "answer": str(i)} for i in range(10)])

    def check(manifest: Manifest, found: dict[str, Any]) -> None:  # which rows are held out is the seed's choice
        assert len(found) == 10
        assert manifest.rejected["by_reason"] == {"over_max_rows": 10 - 3 - 1}
        assert (manifest.splits["train"]["limited"], manifest.splits["heldout"]["limited"]) == (2, 4)
        for origin, outcome in found.items():  # line n holds Q{n-1}
            if outcome[0] == "kept":
                assert outcome[1] == f"Q{int(origin.rsplit(':', 1)[1]) - 1}?"

    return f, {"max_train_rows": 3, "max_heldout_rows": 1, "heldout_fraction": 0.5}, check


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file(tmp_path, name):
    source, kwargs, expect = CASES[name](tmp_path)
    c = DataConfig(source=str(source), output_dir=tmp_path / "out",
                   **{"answer_format": "plain", "system_prompt": "", **kwargs})
    if isinstance(expect, Fails):
        with pytest.raises(expect.error, match=expect.match):
            run_prepare(c)
        return
    manifest = run_prepare(c)
    read_per_split: dict[str, int] = {}
    for file in manifest.source["files"]:  # each row counted once in its file's count, a reject too
        read_per_split[file["split"]] = read_per_split.get(file["split"], 0) + file["rows"]
    assert read_per_split == manifest.source["rows_in"]
    found = outcomes(manifest, tmp_path)
    if callable(expect):
        expect(manifest, found)
        return
    assert set(found) == set(expect), "rows missing from every output, or there that the file does not hold"
    for origin, want in expect.items():
        got = found[origin]
        if isinstance(want, Reject):
            assert got[:2] == ("rejected", want.reason), origin
            assert want.detail in got[2], (origin, got[2])
            if want.reason == "invalid_encoding":
                assert "\ufffd" not in got[2]
        else:
            assert got == ("kept", *want), origin


def test_rejects_keep_the_row_as_written(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", A1, b'{"question": "Caf\xe9?", "answer": "3"}', '{"question": 5, "answer": "3"}',
              A2)
    raw = {r["reason"]: r["raw"] for r in pq.read_table(run_prepare(
        DataConfig(source=str(f), output_dir=tmp_path / "out", answer_format="plain")).rejects_path).to_pylist()}
    assert raw == {"invalid_encoding": '{"question": "Caf\\xe9?", "answer": "3"}',  # the byte shown, not U+FFFD
                   "wrong_type": '{"question": 5, "answer": "3"}'}


# -- number normalisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, number", [
    ("1,080", "1080"), ("12,345,678", "12345678"), ("1,080.50", "1080.5"), ("$18.50", "18.5"), ("7.0", "7"),
    ("-$5", "-5"), ("$-5", "-5"), ("$ 18", "18"), ("18.", "18"), ("-0", "0"), ("02100", "2100"), (" 42 ", "42"),
    ("2, 3", None), ("1,00", None), ("12,34", None), ("1,0000", None), (",5", None), ("1 000", None), ("2 3", None),
    ("--5", None), ("-$-5", None), ("+5", None), (".5", None), ("1e5", None), ("NaN", None), ("Infinity", None),
    ("", None), ("5 6", None), ("18..", None),
])
def test_normalize_number_reads_commas_only_as_thousands_separators(text, number):
    assert normalize_number(text) == number


# -- the dedupe key -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ("How many apples?", "how many  APPLES"), ("What is 6 times 7?", "what is 6 times 7"),
    ("Solve: x = 2.", "solve x = 2"),
    ("Caf\u00e9?", "Cafe\u0301?"),  # one character or two: the same text (NFC)
])
def test_dedupe_key_merges_case_spacing_and_sentence_marks(a, b):
    assert normalize_question(a) == normalize_question(b)


@pytest.mark.parametrize("a, b", [
    ("7 + 3", "7 - 3"), ("7 + 3", "-7 + 3"), ("7 * 3", "7 / 3"), ("(7 + 3) * 2", "7 + 3 * 2"), ("1.5 + 2", "15 + 2"),
    ("2,000 + 1", "2000 + 1"), ("5!", "5"), ("x²", "x2"), ("½", "1/2"), ("Maße?", "Masse?"),
    ("-( -1 + -1 )", "1 - 1"),
])
def test_dedupe_key_keeps_what_changes_the_question(a, b):
    assert normalize_question(a) != normalize_question(b)


def test_reasoning_gym_arithmetic_loses_no_distinct_question(tmp_path):
    # issue #18: the old key (letters and digits only) merged 89 distinct questions of 2,000 into others
    c = DataConfig(source="reasoning_gym:basic_arithmetic", answer_format="plain", output_dir=tmp_path / "out",
                   system_prompt="", reasoning_gym={"size": 2000})
    source = load_source(c.source, train_split="train", heldout_split=None, generator_size=2000, seed=c.seed)
    distinct_in = {row.values["question"].strip() for row in source.splits["train"]}
    m = run_prepare(c)
    distinct_out = {r["question"] for p in (m.train_path, m.heldout_path) for r in pq.read_table(p).to_pylist()}
    assert distinct_out == distinct_in
    assert m.rejected["by_reason"] == {"duplicate": 2000 - len(distinct_in)}  # exact repeats only


# -- property: whatever the rows, each one is in exactly one output, as written ----------------------------------

SEPARATORS = "\n\r\t \u2028\u2029\u0085\u000b\u000c\u001c\u00a0\ufeff"
TEXT = st.text(alphabet=st.one_of(st.characters(codec="utf-8"),  # no lone surrogates: no UTF-8 file holds one
                                  st.sampled_from(SEPARATORS + "+-*/=,.$#0123456789")), max_size=12)
NUMBERISH = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.decimals(allow_nan=False, allow_infinity=False, places=2).map(str),
    st.integers(1000, 10**9).map(lambda n: f"{n:,}"),  # '1,080'
    st.sampled_from(["2, 3", "1,00", "12,34", "$18.50", "-$5", "NaN", "Infinity", "-0", "02100", "7 + 3 = 10", ""]),
)
VALUE = st.one_of(TEXT, NUMBERISH, st.none(), st.integers(), st.floats(), st.booleans(),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# mostly text questions (a question that is not text ends a row before its answer is looked at)
QUESTION = st.one_of(TEXT, TEXT, TEXT, NUMBERISH, VALUE)
ANSWER = st.one_of(NUMBERISH, NUMBERISH, TEXT, VALUE)
ROWS = st.lists(st.fixed_dictionaries({"question": QUESTION, "answer": ANSWER}), min_size=1, max_size=12)
ANCHORS = [{"question": "Anchor question \u2603 one", "answer": "1"},
           {"question": "Anchor question \u2603 two", "answer": "2"}]


def _dump_jsonl(rows: list[dict]) -> tuple[bytes, list[int]]:
    # json.dumps writes NaN / Infinity for float nan / inf, as pandas and Python scripts do
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows), list(range(1, len(rows) + 1))


def _dump_csv(rows: list[dict]) -> tuple[bytes, list[int]]:
    # the standard "\r\n" line end: csv.writer quotes a value holding "\r" only when "\r" is in its line end
    out, lines, line = io.StringIO(), [], 2
    writer = csv.writer(out)
    writer.writerow(["question", "answer"])
    for r in rows:
        before = out.tell()
        writer.writerow([r["question"], r["answer"]])
        lines.append(line)
        line += len(io.StringIO(out.getvalue()[before:], newline="").readlines())  # "\r" inside a value ends a line too
    return out.getvalue().encode(), lines


def _expected_answer(value: Any, answer_type: str) -> str | None:
    """The answer as prepare must keep it: the file's text, stripped, and for numbers normalize_number's form."""
    if answer_type == "text":
        return value.strip() if isinstance(value, str) else None
    if isinstance(value, str):
        return normalize_number(value.strip())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return normalize_number(format(Decimal(repr(value)) if isinstance(value, float) else Decimal(value), "f"))
        except ArithmeticError:
            return None
    return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS, fmt=st.sampled_from(["jsonl", "csv"]), answer_type=st.sampled_from(["number", "text"]))
def test_every_row_is_in_exactly_one_output_as_written(tmp_path_factory, rows, fmt, answer_type):
    d = tmp_path_factory.mktemp("prop")
    rows = ANCHORS + rows
    if fmt == "csv":  # a CSV holds text only; None is an empty value
        rows = [{k: "" if v is None else v for k, v in r.items()} for r in rows
                if all(v is None or isinstance(v, str) for v in r.values())]
    data, lines = (_dump_jsonl if fmt == "jsonl" else _dump_csv)(rows)
    f = d / f"rows.{fmt}"
    f.write_bytes(data)
    c = DataConfig(source=str(f), output_dir=d / "out", answer_format="plain", answer_type=answer_type,
                   heldout_fraction=0.3, system_prompt="")
    try:
        manifest = run_prepare(c)
    except DataError:  # nothing left in a split: only when the anchors collided with generated rows
        assert any(normalize_question(r["question"]) in {normalize_question(a["question"]) for a in ANCHORS}
                   for r in rows[2:] if isinstance(r["question"], str))
        return
    found = outcomes(manifest, d)
    by_origin = {f"rows.{fmt}:{line}": row for line, row in zip(lines, rows)}
    assert set(found) == set(by_origin)  # each row once: in train, held-out or the rejects
    for origin, row in by_origin.items():
        got = found[origin]
        if got[0] == "kept":
            assert got[1] == row["question"].strip()  # the question in the file
            assert got[2] == _expected_answer(row["answer"], answer_type)  # the answer in the file, normalised
        else:
            reason = got[1]
            if reason == "wrong_type":
                assert not isinstance(row["question"], str) or not isinstance(row["answer"], str)
            if reason == "missing_question":
                assert row["question"] is None or row["question"] == "" or not str(row["question"]).strip()
            if reason == "unparsable_answer":
                assert _expected_answer(row["answer"], "number") is None or "=" in str(row["answer"])


# -- publishing: two runs racing on one output, and a dead run's leftovers --------------------------------------

RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import stages.prepare as prepare
    from grpoflow.config import DataConfig

    me, rounds, ready = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    plot = prepare._plot_lengths
    current = {}

    def plot_then_wait(*args):  # hold both runs just before the publish step, where they race
        plot(*args)
        (ready / f"{current['round']}-{me}").touch()
        while len(list(ready.glob(f"{current['round']}-*"))) < 2:
            time.sleep(0.001)

    prepare._plot_lengths = plot_then_wait
    results = []
    for r in range(rounds):
        current["round"] = r
        try:
            m = prepare.run_prepare(DataConfig(source=str(ready.parent / f"src{r}.jsonl"), answer_format="plain",
                                               output_dir=ready.parent / "out", system_prompt=""))
            results.append({"ok": True, "dir": m.output_dir, "cached": m.cached})
        except Exception as e:
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
            (ready / f"{r}-{me}").touch()
    print(json.dumps(results))
""")


def test_two_runs_racing_publish_one_folder_and_both_succeed(tmp_path):
    rounds = 4
    for r in range(rounds):
        jsonl(tmp_path / f"src{r}.jsonl",
              *[{"question": f"Round {r} question {i}?", "answer": str(i)} for i in range(6)])
    (tmp_path / "ready").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, me, str(rounds), str(tmp_path / "ready")], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in ("a", "b")]
    results = []
    for p in racers:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in range(rounds):
        a, b = results[0][r], results[1][r]
        assert a["ok"] and b["ok"], (a, b)
        assert a["dir"] == b["dir"]
        assert sorted([a["cached"], b["cached"]]) == [False, True]  # one published, the other returned it
        assert pq.read_table(Path(a["dir"]) / "train.parquet").num_rows > 0
    out = tmp_path / "out"
    assert len([p for p in out.iterdir() if (p / "manifest.json").is_file()]) == rounds
    assert not list(out.glob("*.tmp-*")) and not list(out.glob(".tmp-*"))


def test_a_dead_runs_tmp_folder_is_removed_by_the_next_run(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", A1, A2)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [out / f".tmp-{host}-{dead.pid}-1a2b3c-0123456789abcdef", out / f"fedcba9876543210.tmp-{dead.pid}"]
    alive = [out / f".tmp-{host}-{os.getpid()}-5e6f7a-0123456789abcdef",  # this process: a run in progress
             out / f".tmp-another-host-{dead.pid}-9c0d1e-0123456789abcdef"]  # not ours to judge
    for folder in stale + alive:
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"half written")
    m = run_prepare(DataConfig(source=str(f), output_dir=out, answer_format="plain"))
    assert [p.exists() for p in stale + alive] == [False, False, True, True]
    assert (Path(m.output_dir) / "manifest.json").is_file()
