"""The parent side of the code sandbox: start the child, feed it, read its results, time it.

One run = one fresh interpreter (`python -I -S -B _sandbox_child.py`) that executes a candidate
against a batch of inputs. What holds it in, outermost first:

- namespaces, when the verifier runs as root: new network (only a loopback, down), pid (the
  child is pid 1 and sees no other process), mount (a private /proc, every mount remounted
  read-only, and a size-capped tmpfs as the only writable dir: the working dir) and ipc;
- a fresh random uid with no capabilities and no_new_privs (setpriv), so file permissions and
  RLIMIT_NPROC apply again. When the interpreter sits under a directory others cannot enter
  (a pyenv under /root, say), the child keeps CAP_DAC_READ_SEARCH only, to read its stdlib;
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

import functools
import hmac
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
# the child reads them (_sandbox_child.py's GUARD_FILES)
GUARD_SCRIPTS = tuple(Path(__file__).with_name(n) for n in ("_sandbox_hook.py", "_sandbox_guard.py"))
FILE_LIMIT_BYTES = 16 << 20  # RLIMIT_FSIZE: no single file the candidate writes grows past this
TMPFS_MB = 64  # the working dir's size cap when it is a tmpfs (namespaced runs)
UID_RANGE = (2_000_000, 3_000_000)  # uids no account uses; one per run, so runs cannot signal each other


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5  # RLIMIT_CPU for the whole child, interpreter start-up included
    wall_seconds: float = 10.0  # the parent kills the process group after this
    memory_mb: int = 512  # RLIMIT_AS
    output_mb: int = 8  # the most the parent reads back from the result channel

    def __post_init__(self):
        if not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 1 or self.wall_seconds <= 0 or self.memory_mb < 64 or self.output_mb < 1:
            raise ValueError(f"SandboxLimits{self}: need cpu_seconds >= 1 (whole seconds, it is an "
                             "rlimit), wall_seconds > 0, memory_mb >= 64 (the interpreter itself "
                             "needs ~30 MB of address space), output_mb >= 1")


@dataclass
class SandboxRun:
    """What came back from one child, before anyone judges it."""

    records: list[dict]  # nonce-checked lines from the result channel, in order
    forged_lines: int  # lines without the nonce: the candidate wrote to the channel itself
    exit_code: int | None  # Popen convention: negative = killed by that signal
    killed_for: str | None  # "wall" or "output" when the parent killed it
    cpu_seconds: float
    wall_seconds: float
    stderr_tail: str = ""


def run_in_sandbox(job: dict, limits: SandboxLimits) -> SandboxRun:
    """Run the child harness on `job` (source, entry_point, args, allowed_imports,
    forbidden_builtins, forbidden_attributes) under `limits`."""
    launcher = _launcher()
    nonce = secrets.token_hex(16)
    uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
    with tempfile.TemporaryDirectory(prefix="grpoflow-sandbox-") as private:
        # private/ holds the child's stderr log; private/work is the candidate's working dir (a
        # tmpfs owned by `uid` when namespaced), so the uid may pass through private/ but not list it.
        os.chmod(private, 0o711)
        work = Path(private, "work")
        work.mkdir(mode=0o700)
        read_end, write_end = os.pipe()
        payload = json.dumps({
            **job, "nonce": nonce, "channel_fd": write_end, "sandbox_dir": str(work),
            "extra_sys_path": _extra_sys_path(job["allowed_imports"]),
            "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_mb << 20,
                       "file_bytes": FILE_LIMIT_BYTES},
        }).encode()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        interpreter = [sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT)]
        command = [*launcher(uid, work), *interpreter] if launcher else interpreter
        stderr_path = Path(private, "stderr")
        try:
            try:
                with open(stderr_path, "wb") as stderr:
                    start = time.monotonic()
                    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=stderr, pass_fds=(write_end,), env=env, cwd=work,
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


def isolation() -> tuple[str, ...]:
    """The mechanisms in force for sandboxed runs on this machine, for logs and reports."""
    base = ("separate interpreter (python -I -S -B), minimal env",
            "rlimits: cpu, address space, file size, open files, processes",
            "task-forbidden builtins and methods taken out of the child's interpreter",
            "audit hook: files, network, processes, threads, signals, frames/gc, module loads, runtime-compiled code")
    if not _launcher():
        return base + ("no namespaces: not root, or unshare/setpriv/mount missing",)
    caps = "CAP_DAC_READ_SEARCH only" if _needs_read_capability() else "no capabilities"
    return base + ("namespaces: net, pid, mount, ipc", f"random uid, {caps}, no_new_privs",
                   f"file system read-only but a {TMPFS_MB} MiB tmpfs working dir")


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

    The interpreter goes first so that unshare reaps it and its CPU time reaches our wait4;
    killing the group at once can take unshare down first and lose that time.
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
        os.killpg(pid, signal.SIGKILL)  # the group: unshare, the child, anything it started
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


def _needs_read_capability() -> bool:
    """True when the unprivileged child could not read its own interpreter, stdlib or harness."""
    leaves = [Path(sys.executable).resolve(), Path(sysconfig.get_paths()["stdlib"]).resolve(),
              CHILD_SCRIPT.resolve(), *(p.resolve() for p in GUARD_SCRIPTS),
              *(Path(p).resolve() for p in site.getsitepackages())]
    for leaf in leaves:
        for directory in leaf.parents:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return True
        if leaf.exists() and not os.stat(leaf).st_mode & stat.S_IROTH:
            return True
    return False


_launcher_lock = threading.Lock()  # code_reward verifies from threads; probe only once


def _launcher():
    with _launcher_lock:
        return _probe_launcher()


@functools.cache
def _probe_launcher():
    """A function uid, workdir -> command prefix that namespaces and de-privileges the child,
    or None where that does not work here (not root, tools missing); probed once per process."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv", "mount")):
        log.warning("code sandbox: running candidates without namespaces or a separate uid (%s). "
                    "Run the verifier as root with util-linux (unshare, setpriv, mount) for full isolation.",
                    "not root" if os.geteuid() != 0 else "unshare/setpriv/mount not found")
        return None
    caps = (["--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
             "--bounding-set=-all,+dac_read_search"] if _needs_read_capability()
            else ["--inh-caps=-all", "--bounding-set=-all"])

    # Runs as root inside the new mount namespace, then drops to `uid`: every mount read-only
    # there (not here; the namespace is private), then a fresh tmpfs over the working dir.
    setup = ('for m in $(cut -d" " -f2 /proc/self/mounts); do mount -o remount,bind,ro "$m" 2>/dev/null; done; '
             'mount -t tmpfs -o "$1" grpoflow-sandbox "$0" && shift && exec "$@"')

    def prefix(uid: int, work: Path) -> list[str]:
        tmpfs = f"size={TMPFS_MB}m,mode=0700,uid={uid},gid={uid},noexec,nosuid,nodev"
        return ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--ipc", "--kill-child", "--",
                "sh", "-c", setup, str(work), tmpfs,
                "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", *caps, "--"]

    # The probe checks the promises, not just the exit code: the working dir is writable and
    # a world-writable dir outside it is read-only.
    outside = Path(tempfile.gettempdir(), f"grpoflow-sandbox-probe-{secrets.token_hex(6)}")
    check = ("import errno, os, sys\nos.chdir(sys.argv[1]); open('scratch', 'w').close()\n"
             "try:\n    open(sys.argv[2], 'w')\nexcept OSError as e:\n    sys.exit(0 if e.errno == errno.EROFS else 4)\n"
             "sys.exit(5)")
    with tempfile.TemporaryDirectory(prefix="grpoflow-sandbox-probe-") as probe:
        os.chmod(probe, 0o711)
        work = Path(probe, "work")
        work.mkdir()
        command = [*prefix(UID_RANGE[0], work), sys.executable, "-I", "-S", "-c", check, str(work), str(outside)]
        result = subprocess.run(command, capture_output=True, timeout=30)
    outside.unlink(missing_ok=True)
    if result.returncode != 0:
        log.warning("code sandbox: namespaces unavailable (the probe exited %d: %s); running candidates "
                    "without network/pid/mount isolation and as the current user.",
                    result.returncode, result.stderr.decode(errors="replace").strip()[-300:])
        return None
    return prefix
