"""Append-only JSON Lines logs that survive a kill: whole records for every reader, a torn tail dropped.

A record is one line, appended with one write() on a file opened O_APPEND (a group of records with
one write too). A write can still be met half done, by a reader while it runs or by a kill or a full
disk that cuts it short, between records or inside one: readers take only lines that end in their
newline, and drop an unterminated last line (with a warning); a run that resumes rewrites the file
without it. So every reader sees whole records, in order. A damaged line anywhere else is not a cut
write but an edit, and is an error naming the file and the line.

Lines are split on "\\n" only: a record may hold U+2028, U+0085 and other characters that
str.splitlines() would take for line ends.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from grpoflow.atomic import write_atomic
from grpoflow.errors import UserError

log = logging.getLogger(__name__)


class DamagedLog(UserError, ValueError):
    """A line that is not JSON before the end of a JSONL file."""


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # one write() unless the kernel takes less (a full disk raises instead)
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's whole records; [] when it does not exist. A torn last line is dropped with a warning."""
    if not path.is_file():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else an unterminated (torn) line
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:  # a cut write never ends in its newline: this is damage
            raise DamagedLog(f"{path}: line {number} is not JSON ({e.msg} at column {e.colno}): the file was "
                             f"edited or damaged; repair or delete that line") from None
    if tail.strip():
        log.warning("%s: the last line is torn (%d bytes without a newline, from a write cut short); dropped",
                    path, len(tail.encode()))
    return records


def rewrite_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the file's content atomically: a kill leaves the old file or the new one, never half."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
