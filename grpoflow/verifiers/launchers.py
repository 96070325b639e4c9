"""How a sandboxed child is started: the launchers that isolate it, and which one works here.

Probed once per process (isolation_in_force), the first of these that is available and keeps its
promises when tried (PROBE: writes nothing but its working dir, sees no other process, has no
network but a loopback):
  1. bubblewrap (`bwrap`), for any user: pid, network, ipc, uts, cgroup and mount namespaces; a
     file system of only the interpreter, its stdlib, the shared libraries, the harness and, where
     the task allows a package from there, site-packages, all read-only, and a size-capped tmpfs
     working dir. Root runs the child as a fresh random uid (setpriv); anyone else, and a root
     that cannot make namespaces itself, as its own uid in a user namespace;
  2. util-linux (`unshare`, `setpriv`, `mount`), as root only, where bwrap is missing or fails;
  3. none: grpoflow/verifiers/sandbox.py then refuses to run candidates unless allowed.
sandbox.py's docstring says what each adds to the walls the child puts up itself.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("grpoflow.verifiers.sandbox")

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
# the child reads them (_sandbox_child.py's GUARD_FILES)
GUARD_SCRIPTS = tuple(Path(__file__).with_name(n) for n in ("_sandbox_hook.py", "_sandbox_guard.py"))
TMPFS_MB = 64  # the working dir's size cap (a tmpfs under either launcher)
UID_RANGE = (2_000_000, 3_000_000)  # uids no account uses; one per run, so runs cannot signal each other
# Under bubblewrap the harness (read-only) and the working dir (the tmpfs) appear under this folder.
BWRAP_ROOT = "/grpoflow-sandbox"
# Ubuntu 22.04 ships 0.6.1. The tmpfs size cap (--size) needs 0.7.0, --disable-userns 0.8.0: older
# versions run without them, and isolation() says so.
BWRAP_MIN_VERSION = (0, 6, 0)
SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")  # where the dynamic loader looks
INSTALL_HINT = "install bubblewrap (Debian, Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
# The probe: run under a launcher before it is trusted, it checks the promises, not just the exit code.
PROBE = """
import os, socket, sys
work, outside = sys.argv[1], sys.argv[2]
os.chdir(work)
open('scratch', 'w').close()
try:
    open(outside, 'w').close()
    sys.exit('could write outside the working dir: ' + outside)
except OSError:
    pass
others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]  # 1: bwrap's
if others:
    sys.exit('sees other processes: ' + ' '.join(others[:5]))
interfaces = [name for _, name in socket.if_nameindex() if name != 'lo']
if interfaces:
    sys.exit('has network interfaces: ' + ' '.join(interfaces))
"""


@dataclass(frozen=True)
class Launch:
    """How to start one child under the isolation in force."""

    prefix: list[str]  # the launcher's command line, up to the interpreter
    python: str  # the interpreter, as the child's file system names it
    harness: str  # the folder of _sandbox_child.py and the guard files, in the child's view
    workdir: str  # the candidate's working dir, in the child's view
    cwd: str  # where the launcher starts, in ours


@dataclass(frozen=True)
class Isolation:
    name: str  # "bubblewrap (fresh uid)", "bubblewrap (user namespace)", "util-linux" or "none"
    mechanisms: tuple[str, ...]  # what it adds to CHILD_LAYERS, for isolation()
    launch: Callable[[Path, list[str], int], Launch]  # (our working dir, dirs to show read-only, a fresh uid)
    reasons: tuple[str, ...] = ()  # why the launchers before it are not used


def run_under(mode: Isolation, source: str, args, timeout: float) -> subprocess.CompletedProcess:
    """`python -I -S -c source WORKDIR ARGS...` under `mode`, without the harness."""
    with tempfile.TemporaryDirectory(prefix="grpoflow-sandbox-") as private:
        os.chmod(private, 0o711)
        work = Path(private, "work")
        work.mkdir(mode=0o700)
        launch = mode.launch(work, [], secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0])
        return subprocess.run([*launch.prefix, launch.python, "-I", "-S", "-c", source, launch.workdir, *args],
                              capture_output=True, timeout=timeout, cwd=launch.cwd,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": launch.workdir})


# -- which isolation, probed once per process ---------------------------------------------------

_probe_lock = threading.Lock()  # code_reward verifies from threads; probe only once


def isolation_in_force() -> Isolation:
    """The launcher candidates run under on this machine (probed at the first call)."""
    with _probe_lock:
        return _probe()


@functools.cache
def _probe() -> Isolation:
    """The first launcher that is available and keeps its promises when tried (PROBE), else none."""
    # Root tries a fresh uid first; a user namespace is next (a container's root, without
    # CAP_SYS_ADMIN, may make one where it cannot make the other namespaces itself).
    builders = [functools.partial(_bubblewrap, fresh_uid=True)] if os.geteuid() == 0 else []
    builders += [functools.partial(_bubblewrap, fresh_uid=False), _util_linux]
    reasons = []
    for build in builders:
        try:
            mode, reason = build()
        except OSError as error:  # one mechanism's probe failing leaves the others to try
            mode, reason = None, f"{getattr(build, 'func', build).__name__.strip('_')}: probe failed ({error})"
        if mode is not None:
            reason = _check(mode)
            if reason is None:
                if reasons:
                    log.warning("code sandbox: isolating with %s; %s", mode.name, "; ".join(reasons))
                log.info("code sandbox: %s", mode.mechanisms[0])
                return mode
        if reason not in reasons:
            reasons.append(reason)
    log.warning("code sandbox: no OS isolation works here (%s); candidates run only with verifier.allow_unsandboxed",
                "; ".join(reasons))
    return Isolation("none", (), _bare_launch, tuple(reasons))


def _check(mode: Isolation) -> str | None:
    """None when a script under `mode` can write its working dir and nothing else on this machine
    (the host's temp dir, world-writable here, is the test), sees no other process and has no
    network interface but a loopback; else what went wrong."""
    outside = Path(tempfile.gettempdir(), f"grpoflow-sandbox-probe-{secrets.token_hex(6)}")
    try:
        result = run_under(mode, PROBE, [str(outside)], timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{mode.name} could not start ({type(e).__name__}: {e})"
    finally:
        outside.unlink(missing_ok=True)
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().splitlines()
        return f"{mode.name} failed its check (exit {result.returncode}: {said[-1][:300] if said else 'no message'})"
    return None


def _bare_launch(work: Path, extra_dirs: list[str], uid: int) -> Launch:
    return Launch([], sys.executable, str(CHILD_SCRIPT.parent), str(work), str(work))


# -- bubblewrap ---------------------------------------------------------------------------------

def _bubblewrap(fresh_uid: bool) -> tuple[Isolation | None, str]:
    """bwrap: (the isolation, "") or (None, why not).

    fresh_uid (root only): unshare makes the pid namespace, bwrap the others (no user namespace),
    and setpriv runs the child as a fresh uid. Otherwise a user namespace, the child as our uid.
    Either way the child's CPU time reaches our wait4 (bwrap's monitor reaps whoever is its
    child; with its own pid namespace and an init in it, it would not wait for that init), and
    the child dies with the trainer: a pid namespace ends with its pid 1, and each link of the
    chain has a parent death signal from a parent allowed to send it. (bwrap's alone, from a
    monitor that is root without capabilities, would not reach a child that is a fresh uid.)
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, f"bubblewrap not found: {INSTALL_HINT}"
    try:
        said = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{bwrap} --version failed ({e})"
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", said)
    version = tuple(int(n) for n in found.groups()) if found else (0, 0, 0)
    if version < BWRAP_MIN_VERSION:
        return None, (f"{bwrap} is bubblewrap {'.'.join(map(str, version))}; the sandbox needs "
                      f"{'.'.join(map(str, BWRAP_MIN_VERSION))} or newer")
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if fresh_uid and not (setpriv and unshare):
        return None, "bubblewrap as root needs setpriv and unshare (util-linux) to run the child as a fresh uid"
    try:
        python, files = _interpreter_files()
        files = list(files)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return None, f"could not ask {sys.executable} which files it reads ({e})"
    if fresh_uid:
        files.append(os.path.realpath(setpriv))

    harness, work = f"{BWRAP_ROOT}/harness", f"{BWRAP_ROOT}/work"
    namespaces = ["--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if fresh_uid:
        # trainer -> unshare (pid 1 of the namespace is its child, bwrap's monitor) -> the child.
        # --mount-proc: bwrap shows the /proc it finds when it makes no pid namespace itself.
        head = [setpriv, "--pdeathsig", "SIGKILL", "--",
                unshare, "--pid", "--fork", "--kill-child", "--mount-proc", "--",
                bwrap, "--die-with-parent", "--new-session", *namespaces, "--cap-drop", "ALL",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        # trainer -> bwrap's monitor -> the child, pid 1 of its namespace. The user namespace
        # cannot make more of them (bubblewrap 0.8): they are the kernel's least tried code.
        head = [bwrap, "--die-with-parent", "--new-session", "--as-pid-1", "--unshare-pid", *namespaces,
                "--cap-drop", "ALL", "--unshare-user", *(["--disable-userns"] if version >= (0, 8, 0) else [])]
    if os.path.isfile("/etc/ld.so.cache"):  # where the loader finds a libpython outside its default dirs
        files.append("/etc/ld.so.cache")
    system, shown, made = _bwrap_mounts(files)
    for directory in SYSTEM_LIBRARY_DIRS:  # merged /usr: /lib -> usr/lib
        if os.path.islink(directory):
            system += ["--symlink", os.readlink(directory), directory]
    size = ["--size", str(TMPFS_MB << 20)] if version >= (0, 7, 0) else []
    # /proc read-only: a root in a user namespace (a container's) still owns the host's
    # sysctls and sysrq-trigger there. The working dir: the user's own inside its namespace; for a
    # fresh uid, open to all (sticky), which here means to that uid: nothing else sees this mount.
    tail = ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev",
            "--perms", "0755", "--dir", BWRAP_ROOT, "--perms", "0755", "--dir", harness]
    for script in (CHILD_SCRIPT, *GUARD_SCRIPTS):
        tail += ["--ro-bind", str(script), f"{harness}/{script.name}"]
    tail += [*size, "--perms", "01777" if fresh_uid else "0700", "--tmpfs", work,
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", work, "--"]

    def launch(_work: Path, extra_dirs: list[str], uid: int) -> Launch:
        packages, _, _ = _bwrap_mounts(extra_dirs, shown, made)
        drop = ([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "--"] if fresh_uid else [])
        return Launch([*head, *system, *packages, *tail, *drop], python, harness, work, "/")

    who = "a fresh random uid" if fresh_uid else f"this process's uid ({os.geteuid()}) in a user namespace" + (
        " that cannot make more of them" if version >= (0, 8, 0) else " (bubblewrap < 0.8: it may make more)")
    cap = f"a {TMPFS_MB} MiB tmpfs" if size else "a tmpfs (no size cap: bubblewrap < 0.7)"
    mechanisms = (f"isolation: bubblewrap {'.'.join(map(str, version))} ({bwrap})",
                  "namespaces: pid, net (a loopback of its own), ipc, uts, cgroup, mount"
                  + ("" if fresh_uid else ", user"),
                  f"{who}, no capabilities, no_new_privs",
                  f"files: only the interpreter, its stdlib, shared libraries and the harness, read-only; "
                  f"{cap} working dir; no home dir, project or /tmp")
    return Isolation("bubblewrap " + ("(fresh uid)" if fresh_uid else "(user namespace)"), mechanisms, launch), ""


@functools.cache
def _interpreter_files() -> tuple[str, tuple[str, ...]]:
    """The base interpreter (a venv's python is a link to it) and what it reads to start and to
    import the stdlib: its sys.path under -I -S, and libpython where that is a shared library."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    ask = ("import json, sys, sysconfig\nv = sysconfig.get_config_var\n"
           "print(json.dumps([sys.path, v('Py_ENABLE_SHARED') and f\"{v('LIBDIR')}/{v('INSTSONAME')}\"]))")
    said = subprocess.run([python, "-I", "-S", "-c", ask], capture_output=True, text=True, timeout=30, check=True)
    path, libpython = json.loads(said.stdout)
    files = [python, *(p for p in path if os.path.exists(p))]
    if libpython and os.path.exists(libpython):
        files.append(libpython)
    files += [d for d in SYSTEM_LIBRARY_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    return python, tuple(files)


def _bwrap_mounts(paths, shown: frozenset[str] = frozenset(), made: frozenset[str] = frozenset()):
    """bwrap options that show each path read-only at its own place, leaving out what a path shown
    before already shows. The folders bwrap makes on the way are 0755 (not its default 0700), so
    that root's fresh uid can walk through them. Returns the options, the paths now shown and the
    folders now made, for the next call to build on."""
    args, shown, made = [], set(shown), set(made)
    for path in sorted({os.path.abspath(p) for p in paths}, key=lambda p: (p.count("/"), p)):
        if any(path == s or path.startswith(s + "/") for s in shown):
            continue
        for parent in map(str, reversed(Path(path).parents[:-1])):
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
        shown.add(path)
    return args, frozenset(shown), frozenset(made)


# -- util-linux, as root --------------------------------------------------------------------------

def _util_linux() -> tuple[Isolation | None, str]:
    """unshare, setpriv and mount as root: (the isolation, "") or (None, why not)."""
    if os.geteuid() != 0:
        return None, "util-linux namespaces need root"
    tools = {t: shutil.which(t) for t in ("unshare", "setpriv", "mount", "sh")}
    if not all(tools.values()):
        return None, f"util-linux: {', '.join(t for t, found in tools.items() if not found)} not found"
    read = _needs_read_capability()
    caps = (["--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
             "--bounding-set=-all,+dac_read_search"] if read else ["--inh-caps=-all", "--bounding-set=-all"])

    # Runs as root inside the new mount namespace, then drops to `uid`: every mount read-only
    # there (not here; the namespace is private), then a fresh tmpfs over the working dir.
    setup = ('for m in $(cut -d" " -f2 /proc/self/mounts); do mount -o remount,bind,ro "$m" 2>/dev/null; done; '
             'mount -t tmpfs -o "$1" grpoflow-sandbox "$0" && shift && exec "$@"')

    def launch(work: Path, extra_dirs: list[str], uid: int) -> Launch:
        tmpfs = f"size={TMPFS_MB}m,mode=0700,uid={uid},gid={uid},noexec,nosuid,nodev"
        prefix = [tools["unshare"], "--net", "--pid", "--fork", "--mount-proc", "--ipc", "--kill-child", "--",
                  tools["sh"], "-c", setup, str(work), tmpfs, tools["setpriv"], f"--reuid={uid}", f"--regid={uid}",
                  "--clear-groups", "--no-new-privs", *caps, "--"]
        return Launch(prefix, sys.executable, str(CHILD_SCRIPT.parent), str(work), str(work))

    caps_text = "CAP_DAC_READ_SEARCH only" if read else "no capabilities"
    mechanisms = ("isolation: util-linux (unshare, setpriv, mount), as root",
                  "namespaces: net, pid, mount, ipc", f"random uid, {caps_text}, no_new_privs",
                  f"file system read-only but a {TMPFS_MB} MiB tmpfs working dir")
    return Isolation("util-linux", mechanisms, launch), ""


def _needs_read_capability() -> bool:
    """True when the unprivileged child could not read its own interpreter, stdlib or harness."""
    return _closed_to_others([Path(sys.executable), Path(sysconfig.get_paths()["stdlib"]), CHILD_SCRIPT,
                              *GUARD_SCRIPTS, *map(Path, site.getsitepackages())])


def _closed_to_others(leaves: list[Path]) -> bool:
    """True when another user could not reach one of these files or folders: a folder above it
    without o+x, or itself without o+r. Only what exists counts: site.getsitepackages() names folders
    a layout may lack (the GPU machine's /opt/torch/.venv/local/lib/python3.12, 2026-12-06, whose
    os.stat stopped every sandboxed run)."""
    for leaf in filter(Path.exists, (p.resolve() for p in leaves)):
        for directory in leaf.parents:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return True
        if not os.stat(leaf).st_mode & stat.S_IROTH:
            return True
    return False
