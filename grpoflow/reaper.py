"""Children die with their parent, however the parent dies.

A `kill -9` of a flow leaves what it started running: Prefect's temporary API server, llama.cpp's
GGUF converter, the math-verify server (its own session), torchrun's ranks. Nothing in a killed
process can clean up, so a watchdog does it from outside:

    watch_children()      # once, early: starts `python -m grpoflow.reaper <pid>` in a session of its own

The watchdog holds the read end of a pipe whose write end only this process has. While the pipe is
open it notes, every POLL_S, every process descending from this one (by /proc's parent links, with
each one's start time, so a reused pid is never mistaken for ours). When the pipe closes (this
process exited or was killed), it adds every process whose environment carries this one's mark
(GRPOFLOW_WATCHED_BY, set here and inherited: it finds a child started just before the kill, already
orphaned and not yet noted), sends SIGTERM to all of them still running and to their children, then
SIGKILL to whatever is left after GRACE_S. Linux only (/proc); elsewhere a no-op.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.2
GRACE_S = 5.0

_watching: dict[int, subprocess.Popen] = {}  # pid of the watched process -> its watchdog


def watch_children() -> None:
    """Start this process's watchdog (once per process; forked children start their own)."""
    pid = os.getpid()
    if pid in _watching or not Path("/proc/self/stat").is_file():
        return
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, False)  # only this process holds it: its death closes the pipe
    mark = _mark(pid)
    watchdog = subprocess.Popen([sys.executable, "-m", "grpoflow.reaper", str(pid), mark], stdin=read_end,
                                start_new_session=True, close_fds=True, cwd=Path(__file__).resolve().parents[1],
                                env={k: v for k, v in os.environ.items() if k != MARK})
    # every process started from here on inherits the mark: one started in the last moments before a
    # kill, not yet noted and orphaned at once, is still found by it
    os.environ[MARK] = mark
    os.close(read_end)
    _watching[pid] = watchdog
    _keep_open.append(write_end)


_keep_open: list[int] = []  # write ends, never closed by us: the kernel closes them when we die

MARK = "GRPOFLOW_WATCHED_BY"  # environment variable: the watched process, as "<pid>-<start time>"


def _mark(pid: int) -> str:
    info = _stat(pid)
    return f"{pid}-{info[1] if info else 0}"


def marked(mark: str) -> dict[int, int]:
    """The running processes whose environment carries `mark` (as they were started), as pid -> start time."""
    needle = f"{MARK}={mark}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle in environ.split(b"\0") and (info := _stat(int(entry))) is not None:
            found[int(entry)] = info[1]
    return found


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a running process; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...; starttime is field 22
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every process under `root`, as pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            children.setdefault(info[0], []).append((int(entry), info[1]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _still_ours(noted: dict[int, int]) -> dict[int, int]:
    """The noted processes still running (same start time), with any children they started since."""
    alive = {pid: start for pid, start in noted.items() if (info := _stat(pid)) is not None and info[1] == start}
    for pid in list(alive):
        alive.update(descendants(pid))
    return alive


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def watch(parent: int, mark: str) -> None:
    me, born = os.getpid(), _stat(parent)
    noted: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([0], [], [], POLL_S)
        if ready and not os.read(0, 4096):  # EOF: the parent is gone
            break
        if born is None or _stat(parent) is None or _stat(parent)[1] != born[1]:  # gone, a fork holding the pipe
            break
        noted.update({pid: start for pid, start in descendants(parent).items() if pid != me})
        noted = {pid: start for pid, start in noted.items() if (info := _stat(pid)) is not None and info[1] == start}
    noted.update(marked(mark))
    noted.pop(me, None)
    left = _still_ours(noted)
    _signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while (left := _still_ours(left)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all(left, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the parent, not for us
    watch(int(sys.argv[1]), sys.argv[2])
