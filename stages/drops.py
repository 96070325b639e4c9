"""The drops folder: which files are ready, which are still arriving, which are set aside and why.

    scan = scan_drops(cfg)      # one look: ready drops, and what was done with every other file
    scan.ready                  # files data prep may read: settled, readable, with the question column

A drop is any data file data prep reads (.jsonl, .json, .csv, .parquet, .arrow, .feather). Each file in
drop_dir is, on every look:
    waiting      its name starts with "." or ends like a download in progress (.tmp, .part, ...), or it
                 changed in the last continuous.settle_seconds: looked at again at the next poll
    ignored      another suffix: named in the log and in `grpoflow continuous --status`, left where it is
    quarantined  unreadable as its suffix says, or no row has the question or answer column: moved to
                 <drop_dir>/rejected/<name> beside <name>.reason.txt, so the drops beside it still train
    ready        everything else, checked once per (size, mtime) and remembered in <state_dir>/drops.json

Rows of a ready drop that data prep rejects (a bad line, a duplicate) stay in its rejects.parquet with
their reason; drops.json says how many each drop lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoflow.atomic import write_atomic
from grpoflow.clock import now_iso
from grpoflow.config import PipelineConfig
from grpoflow.data_files import FILE_SUFFIXES, SourceError, read_file

log = logging.getLogger("grpoflow.continuous")

IN_PROGRESS = (".tmp", ".part", ".partial", ".crdownload", ".download", ".incomplete", ".swp")
QUARANTINE = "rejected"
RECORD = "drops.json"


@dataclass
class DropScan:
    ready: list[Path] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # name -> why not yet
    ignored: dict[str, str] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)  # name -> reason (this look's; earlier in the record)


def scan_drops(cfg: PipelineConfig, now: float | None = None) -> DropScan:
    cc, now = cfg.continuous, time.time() if now is None else now
    drop_dir, record_path = Path(cc.drop_dir), Path(cc.state_dir) / RECORD
    record = read_record(record_path)
    scan = DropScan()
    for path in sorted(p for p in drop_dir.iterdir() if p.is_file()):
        name, stat = path.name, path.stat()
        if name.startswith(".") or name.lower().endswith(IN_PROGRESS):
            scan.waiting[name] = "still being written (a temporary name): it is read once renamed"
            continue
        if path.suffix not in FILE_SUFFIXES:
            scan.ignored[name] = f"not a data file: the suffix is not one of {', '.join(FILE_SUFFIXES)}"
            continue
        age = now - stat.st_mtime
        if age < cc.settle_seconds:
            scan.waiting[name] = f"changed {age:.0f} s ago: read once unchanged for {cc.settle_seconds} s"
            continue
        seen = record["drops"].get(name, {})
        if seen.get("status") == "ready" and seen.get("size") == stat.st_size and seen.get("mtime") == stat.st_mtime_ns:
            scan.ready.append(path)
            continue
        problem = drop_problem(path, cfg)
        if problem is None:
            record["drops"][name] = {"status": "ready", "size": stat.st_size, "mtime": stat.st_mtime_ns,
                                     "checked_at": now_iso()}
            scan.ready.append(path)
        else:
            moved = quarantine(path, problem)
            record["drops"][name] = {"status": "quarantined", "reason": problem, "moved_to": str(moved),
                                     "checked_at": now_iso()}
            scan.quarantined[name] = problem
            log.warning("drop %s set aside in %s: %s", path, moved.parent, problem)
    for name, why in scan.ignored.items():
        if record["ignored"].get(name) != why:
            log.warning("drop folder %s: %s ignored: %s", drop_dir, name, why)
    record["ignored"], record["waiting"] = scan.ignored, scan.waiting
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    return scan


def drop_problem(path: Path, cfg: PipelineConfig) -> str | None:
    """Why data prep cannot use this file at all; None when it can (bad rows are rejected one by one there)."""
    try:
        rows, unreadable = read_file(path, path.read_bytes(), "train")
    except SourceError as e:
        return str(e).removeprefix(f"{path}: ")
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not rows:
        return f"no row could be read ({len(unreadable)} unreadable record(s))" if unreadable else "the file is empty"
    for key in ("question_column", "answer_column"):
        column = getattr(cfg.data, key)
        if not any(column in r.values for r in rows):
            found = sorted({k for r in rows[:100] for k in r.values})
            return f"no row has the column {column!r} (data.{key}); its columns: {', '.join(map(repr, found)) or 'none'}"
    return None


def quarantine(path: Path, reason: str) -> Path:
    """Move `path` to drop_dir/rejected/ (a free name: the user's, then name-2, ...) with its reason beside it."""
    folder = path.parent / QUARANTINE
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        n += 1
        target = folder / f"{path.stem}-{n}{path.suffix}"
    os.replace(path, target)
    write_atomic(target.with_name(target.name + ".reason.txt"), f"{path}: {reason}\n")
    return target


def read_record(path: Path) -> dict[str, Any]:
    """<state_dir>/drops.json: every drop seen by name, and this look's ignored and waiting files."""
    empty: dict[str, Any] = {"drops": {}, "ignored": {}, "waiting": {}}
    if not path.is_file():
        return empty
    return {**empty, **json.loads(path.read_text())}
