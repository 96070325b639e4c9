"""Files and folders that appear whole or not at all.

Everything a later run reads to decide what is done (a converted model, a checkpoint, a GGUF, a
round, a report) is written under a temporary name beside its final one and renamed into place in
one step, so a kill, a full disk or an error leaves either the old content or the new, never half:

    with atomic_folder(out / "merged") as tmp:     # tmp: an empty folder beside out/merged
        model.save_pretrained(tmp)                  # out/merged appears (or is replaced) on success
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(...)
    write_atomic(out / "report.json", text)

Temporary names start with TEMP and carry the host and process that made them, then the final name
(whose suffix programs may look at, like llama.cpp's converter): a folder left by a process that was
killed is removed by `remove_stale` (the next run's), one of a live process never.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

TEMP = ".tmp-"


def temporary_name(final: Path) -> Path:
    """A unique name beside `final`: .tmp-<host>-<pid>-<random>-<name>."""
    return final.with_name(f"{TEMP}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}-{final.name}")


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """An empty folder to fill; on success it replaces `final` (whatever was there goes), on an error
    it is removed and `final` is left as it was."""
    tmp = temporary_name(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`. An old `final` is renamed away first, then removed: a kill
    in between leaves a .tmp-* folder (removed by the next run), never a half-deleted `final`."""
    if final.exists():
        old = temporary_name(final)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """A path to write (by us or by another program); on success it replaces `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_atomic(final: Path, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text)


def remove_stale(folder: Path) -> list[str]:
    """Remove the temporaries in `folder` that a process of this host left when it died; their names."""
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for path in sorted(folder.glob(f"{TEMP}*")):
        pid = _pid_of(path.name, host)
        if pid is None or process_alive(pid):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # two runs may both be removing it
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def remove_stale_under(root: Path) -> list[str]:
    """remove_stale in `root` and every folder below it (not inside the temporaries themselves); the
    paths removed, relative to `root`."""
    removed: list[str] = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(TEMP)]
        removed += [str((Path(folder) / name).relative_to(root)) for name in remove_stale(Path(folder))]
    return removed


def _pid_of(name: str, host: str) -> int | None:
    """The pid in a temporary_name made on `host`; None for another host's or another kind of name."""
    prefix = f"{TEMP}{host}-"
    pid = name[len(prefix):].partition("-")[0] if name.startswith(prefix) else ""
    return int(pid) if pid.isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
