"""The parent side of the code sandbox: start the child, feed it, read its results, time it.

One run = one fresh interpreter (`python -I -S -B _sandbox_child.py`) that executes a candidate
against a batch of inputs. What holds it in, outermost first:

- a view of the machine of its own, from the first of these that works here (probed once per
  process in grpoflow/verifiers/launchers.py; isolation() says which, and why not the ones
  before it):
  1. bubblewrap (`bwrap`), for any user. Namespaces: pid (the child sees no other process but
     bwrap's own, and dies with the trainer), network (a loopback of its own: nothing on this
     machine or beyond is reachable), ipc, uts, cgroup and mount. Its file system holds only the
     interpreter, its stdlib, the shared libraries, the three harness files and, where the task
     allows a package from there, site-packages, all read-only, and a size-capped tmpfs as the
     only writable dir: the working dir. No home dir, no project, no /tmp, /proc read-only. No
     capabilities, no_new_privs. For root, bwrap makes the namespaces itself (unshare the pid
     one) and setpriv runs the child as a fresh random uid, so file permissions and RLIMIT_NPROC
     (which root escapes) apply to it. For anyone else, and for a root that cannot make
     namespaces itself (a container's, without CAP_SYS_ADMIN), the child runs as this process's
     uid inside a new user namespace that cannot make more of them;
  2. util-linux (`unshare`, `setpriv`, `mount`), as root only, where bwrap is missing or fails
     (no user namespaces, say): new network, pid, mount and ipc namespaces, the whole file
     system remounted read-only but a tmpfs working dir, and a fresh random uid. When the
     interpreter sits under a directory others cannot enter (a pyenv under /root), the child
     keeps CAP_DAC_READ_SEARCH only, to read its stdlib;
  3. none: run_in_sandbox raises SandboxUnavailable, unless allow_unsandboxed() was called (the
     config's verifier.allow_unsandboxed), which runs the child as the current user with only
     the layers below;
- rlimits set by the child before any candidate code runs: CPU, address space, file size,
  open files, processes;
- in the child, before any candidate code runs (see _sandbox_guard.py): the task's forbidden
  builtins and methods taken out of the interpreter, and an audit hook that refuses file
  writes outside the working dir, reads outside it and the stdlib, sockets, processes,
  threads, signal handlers, frames, gc and loading modules the task does not allow;
- a wall clock here: the whole process group is killed at the deadline.

Time is measured here, never reported by the child: wall time around the process, CPU time
from os.wait4's rusage (the child and everything it reaped), so a candidate that patches
time.perf_counter changes nothing.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import selectors
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from grpoflow.errors import UserError
from grpoflow.verifiers.launchers import (CHILD_SCRIPT, INSTALL_HINT, UID_RANGE, Isolation, isolation_in_force,
                                          run_under)

log = logging.getLogger(__name__)

FILE_LIMIT_BYTES = 16 << 20  # RLIMIT_FSIZE: no single file the candidate writes grows past this
# What holds in the child whatever launches it.
CHILD_LAYERS = ("separate interpreter (python -I -S -B), minimal env",
                "rlimits: cpu, address space, file size, open files, processes",
                "task-forbidden builtins and methods taken out of the child's interpreter",
                "audit hook: files, network, processes, threads, signals, frames/gc, module loads, "
                "runtime-compiled code")


class SandboxUnavailable(UserError, RuntimeError):
    """No OS isolation works here and unsandboxed runs were not allowed; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5  # RLIMIT_CPU for the whole child, interpreter start-up included
    wall_seconds: float = 10.0  # the parent kills the process group after this
    memory_mb: int = 512  # RLIMIT_AS
    output_mb: int = 8  # the most the parent reads back from the result channel

    def __post_init__(self):
        if (not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 1 or self.wall_seconds <= 0
                or self.memory_mb < 64 or self.output_mb < 1):
            raise ValueError(f"SandboxLimits{self}: need cpu_seconds >= 1 (whole seconds, it is an "
                             "rlimit), wall_seconds > 0, memory_mb >= 64 (the interpreter itself "
                             "needs ~30 MB of address space), output_mb >= 1")


@dataclass
class SandboxRun:
    """What came back from one child, before anyone judges it."""

    records: list[dict]  # nonce-checked lines from the result channel, in order
    forged_lines: int  # lines without the nonce: the candidate wrote to the channel itself
    exit_code: int | None  # Popen convention: negative = killed by that signal (bubblewrap reports 128 + it)
    killed_for: str | None  # "wall" or "output" when the parent killed it
    cpu_seconds: float
    wall_seconds: float
    stderr_tail: str = ""


_allow_unsandboxed = False


def allow_unsandboxed(allowed: bool = True) -> None:
    """Where no OS isolation works here, run candidates anyway: as the current user, with only the
    rlimits and the child's audit hook between them and this user's files and network. Off by
    default, and then run_in_sandbox raises SandboxUnavailable. The pipeline sets it from the
    config's verifier.allow_unsandboxed (run_stage in stages/dag.py)."""
    global _allow_unsandboxed
    _allow_unsandboxed = bool(allowed)


@contextlib.contextmanager
def unsandboxed_allowed(allowed: bool) -> Iterator[None]:
    """allow_unsandboxed(allowed) for the duration of a block (a stage run), then as it was."""
    global _allow_unsandboxed
    before, _allow_unsandboxed = _allow_unsandboxed, bool(allowed)
    try:
        yield
    finally:
        _allow_unsandboxed = before


def run_in_sandbox(job: dict, limits: SandboxLimits) -> SandboxRun:
    """Run the child harness on `job` (source, entry_point, args, allowed_imports,
    forbidden_builtins, forbidden_attributes) under `limits`."""
    mode = _usable_isolation()
    nonce = secrets.token_hex(16)
    uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
    extra_sys_path = _extra_sys_path(job["allowed_imports"])
    with tempfile.TemporaryDirectory(prefix="grpoflow-sandbox-") as private:
        # private/ holds the child's stderr log; private/work is the candidate's working dir under
        # util-linux (a tmpfs owned by `uid`) or none, so the uid may pass through private/ but not list it.
        os.chmod(private, 0o711)
        work = Path(private, "work")
        work.mkdir(mode=0o700)
        launch = mode.launch(work, extra_sys_path, uid)
        read_end, write_end = os.pipe()
        payload = json.dumps({
            **job, "nonce": nonce, "channel_fd": write_end, "sandbox_dir": launch.workdir,
            "extra_sys_path": extra_sys_path,
            "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_mb << 20,
                       "file_bytes": FILE_LIMIT_BYTES},
        }).encode()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": launch.workdir, "TMPDIR": launch.workdir,
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [*launch.prefix, launch.python, "-I", "-S", "-B", f"{launch.harness}/{CHILD_SCRIPT.name}"]
        stderr_path = Path(private, "stderr")
        try:
            try:
                with open(stderr_path, "wb") as stderr:
                    start = time.monotonic()
                    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=stderr, pass_fds=(write_end,), env=env, cwd=launch.cwd,
                                            start_new_session=True)
            finally:
                os.close(write_end)  # from here, EOF on read_end means the child is gone
            feeder = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
            feeder.start()
            deadline = start + limits.wall_seconds
            output, killed_for = _read_channel(read_end, deadline, limits.output_mb << 20)
            status, rusage, killed_for = _reap(proc, deadline, killed_for)
            wall = time.monotonic() - start
            feeder.join(timeout=1)
        finally:
            os.close(read_end)
        stderr_tail = stderr_path.read_bytes()[-2000:].decode("utf-8", "replace")
    records, forged = _parse(output, nonce)
    return SandboxRun(records=records, forged_lines=forged, exit_code=os.waitstatus_to_exitcode(status),
                      killed_for=killed_for, cpu_seconds=rusage.ru_utime + rusage.ru_stime,
                      wall_seconds=wall, stderr_tail=stderr_tail)


def run_script(source: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -I -S -c source WORKDIR ARGS...` under the isolation in force, without the harness
    (no rlimits, no audit hook): the walls of the OS alone. sys.argv[1] is the working dir, which
    the script enters itself. For the probe, and for tests."""
    return run_under(_usable_isolation(), source, args, timeout)


def isolation() -> tuple[str, ...]:
    """Which isolation is in force for sandboxed runs on this machine, then every mechanism that
    holds the child in, for logs and reports. The first line names the launcher."""
    mode = isolation_in_force()
    if mode.name != "none":
        return (*mode.mechanisms, *CHILD_LAYERS)
    allowed = ("runs allowed by verifier.allow_unsandboxed" if _allow_unsandboxed
               else "runs refused unless verifier.allow_unsandboxed: true")
    return (f"isolation: none ({'; '.join(mode.reasons)}); {allowed}", *CHILD_LAYERS)


def _usable_isolation() -> Isolation:
    mode = isolation_in_force()
    if mode.name == "none" and not _allow_unsandboxed:
        raise SandboxUnavailable(
            f"code sandbox: no OS isolation works here ({'; '.join(mode.reasons)}). Model-written code would run "
            f"as this user, with only rlimits and an audit hook between it and your files and network. Fix: "
            f"{INSTALL_HINT}; or, to run it that way anyway, set verifier.allow_unsandboxed: true "
            "(grpoflow.verifiers.allow_unsandboxed() outside the pipeline)")
    return mode


def _feed(pipe, payload: bytes) -> None:
    try:
        pipe.write(payload)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass  # the child died before reading its job; the missing results say so


def _read_channel(fd: int, deadline: float, cap: int) -> tuple[bytes, str | None]:
    chunks, size = [], 0
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks), "wall"
            if not selector.select(remaining):
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                return b"".join(chunks), None
            size += len(data)
            if size > cap:
                return b"".join(chunks), "output"
            chunks.append(data)


def _reap(proc: subprocess.Popen, deadline: float, killed_for: str | None):
    """Wait for the child with os.wait4 (Popen.wait would drop its rusage), killing at the deadline."""
    while killed_for is None:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            killed_for = "wall"
        else:
            time.sleep(0.002)
    if killed_for is not None:
        status, rusage = _kill(proc.pid)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    return status, rusage, killed_for


def _kill(pid: int):
    """SIGKILL the sandboxed interpreter, then its process group, and reap the launcher.

    The launcher's child goes first (the interpreter, or bwrap's monitor as pid 1 of its
    namespace, whose death ends the namespace) so that the launcher reaps it and its CPU time
    reaches our wait4; killing the group at once can take the launcher down first and lose that time.
    """
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(int(child), signal.SIGKILL)
        except ProcessLookupError:
            pass
    give_up = time.monotonic() + 0.5
    while children and time.monotonic() < give_up:
        reaped, status, rusage = os.wait4(pid, os.WNOHANG)
        if reaped:
            return status, rusage
        time.sleep(0.002)
    try:
        os.killpg(pid, signal.SIGKILL)  # the group: the launcher, the child, anything it started
    except ProcessLookupError:
        pass
    _, status, rusage = os.wait4(pid, 0)
    return status, rusage


def _parse(output: bytes, nonce: str) -> tuple[list[dict], int]:
    records, forged = [], 0
    tag = nonce.encode()
    lines = output.split(b"\n")[:-1]  # a last line without "\n" was cut off by a kill: not a record
    for line in lines:
        head, sep, body = line.partition(b"\t")
        if not sep or not hmac.compare_digest(head, tag):
            forged += 1
            continue
        try:
            record = json.loads(body)
        except (ValueError, RecursionError):
            record = {"unreadable": True}
        records.append(record if isinstance(record, dict) else {"unreadable": True})
    return records, forged


def _extra_sys_path(allowed_imports) -> list[str]:
    """Site-packages only when the task allows a module from there: -S keeps them out otherwise."""
    if all(name in sys.stdlib_module_names for name in allowed_imports):
        return []
    paths = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    return sorted({p for p in paths if os.path.isdir(p)})
