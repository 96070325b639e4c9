"""The code sandbox's walls outside the interpreter (issue #28), as root and as an ordinary user.

Each attempt runs twice. As a candidate (verify_code), it must fail, whichever layer stops it. As
a plain script under the same launcher without the harness (sandbox.run_script: no rlimits, no
audit hook), only the OS can stop it, so there it must fail with an OSError: the file is not
there, the port is not reachable, the process is not visible, the file system is read-only.

Whoever runs pytest runs these tests. As root, test_the_same_tests_pass_as_an_ordinary_user runs
this file and the verifier's own two test files again, as a uid with no account, no groups and no
capabilities, so both sides of bubblewrap (root's fresh uid; a user namespace) are tried.
No mocks, except stand-in `bwrap`s that fail, for what this machine is not: a kernel without user
namespaces, a container's root without CAP_SYS_ADMIN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import secrets
import shutil
import site
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from grpoflow.verifiers import SandboxLimits, get_code_task, isolation, verify_code
from grpoflow.verifiers import sandbox

ROOT = Path(__file__).resolve().parents[1]
SORT = get_code_task("sort_list")
# sort_list, letting the candidate import what it needs to try: below the import allow-list, the
# audit hook and the OS stop it.
OPEN = dataclasses.replace(
    SORT, name="sort_list_open", n_checks=2, allowed_imports=SORT.allowed_imports | {"os", "socket"},
    limits=SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_mb=256),
)
SELECTION_SORT = """
def sort_list(xs):
    out, rest = [], list(xs)
    while rest:
        out.append(min(rest))
        rest.remove(out[-1])
    return out
"""
REFUSED = 7  # what an attempt exits with when the OS said no (an OSError)
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap is not installed (Debian, Ubuntu: apt-get install bubblewrap)")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """The caller's home, with the kind of files a reward hacker would want."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text("hf_secret")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def listener():
    """A port open on this machine's loopback; the test fails if anything connected to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server.getsockname()[1]
    try:
        connection, _ = server.accept()
        connection.close()
        connected = True
    except BlockingIOError:
        connected = False
    server.close()
    assert not connected, "the sandbox reached a port on the caller's loopback"


def attempt(body: str, *args: str) -> subprocess.CompletedProcess:
    """`body` as a script under the launcher alone; exits REFUSED on an OSError, 0 if it got through."""
    script = (f"import os, socket, sys\ntry:\n{textwrap.indent(body.strip(), '    ')}\n"
              f"except OSError as e:\n    print(type(e).__name__, e)\n    sys.exit({REFUSED})\n")
    return sandbox.run_script(script, *args)


def refused_by_os(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == REFUSED


def candidate(before: str) -> str:
    """A correct sort_list that first runs `before` (with os and socket imported)."""
    body = textwrap.indent(before, "    ") + "\n    out, rest"
    return "import os, socket\n" + SELECTION_SORT.replace("    out, rest", body, 1)


# -- which isolation ----------------------------------------------------------------------------

@needs_bwrap
def test_bubblewrap_isolates_where_it_is_installed():
    mechanisms = isolation()
    assert mechanisms[0].startswith("isolation: bubblewrap"), mechanisms
    who = "a fresh random uid" if os.geteuid() == 0 else f"this process's uid ({os.geteuid()}) in a user namespace"
    assert any(m.startswith(who) for m in mechanisms), mechanisms
    assert verify_code(SELECTION_SORT, SORT).passed


# -- the caller's files -------------------------------------------------------------------------

@needs_bwrap
def test_the_callers_home_is_not_there(home):
    for secret in (home / ".ssh" / "id_ed25519", home / ".cache" / "huggingface" / "token"):
        assert refused_by_os(attempt("print(open(sys.argv[2]).read())", str(secret)))
        assert not verify_code(candidate(f"print(open({str(secret)!r}).read())"), OPEN).passed
    assert refused_by_os(attempt("print(os.listdir(sys.argv[2]))", str(home)))


@needs_bwrap
def test_the_project_is_not_there():
    assert refused_by_os(attempt("print(os.listdir(sys.argv[2]))", str(ROOT)))
    references = ROOT / "grpoflow" / "verifiers" / "code_tasks.py"  # the expected answers come from here
    assert refused_by_os(attempt("print(open(sys.argv[2]).read())", str(references)))
    assert not verify_code(candidate(f"open({str(references)!r}).read()"), OPEN).passed


@needs_bwrap
def test_nothing_is_writable_but_the_working_dir(tmp_path, home):
    targets = [tmp_path / "outside.txt", home / ".bashrc", ROOT / "pwned.txt",
               Path(tempfile.gettempdir(), f"grpoflow-pwned-{secrets.token_hex(4)}"),
               Path(sys.base_prefix, "pwned.txt"), Path("/dev/shm/pwned.txt"), Path("/pwned.txt")]
    for target in targets:
        assert refused_by_os(attempt("open(sys.argv[2], 'w').write('x')", str(target))), target
        assert not verify_code(candidate(f"open({str(target)!r}, 'w').write('x')"), OPEN).passed
        assert not target.exists(), target
    # nor are the host kernel's settings, which root in a user namespace would own (opened, not written)
    for setting in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname"):
        assert refused_by_os(attempt("os.close(os.open(sys.argv[2], os.O_WRONLY))", setting)), setting
    # the working dir itself is writable, and is the candidate's HOME and TMPDIR
    assert attempt("open('scratch', 'w').write('x')\nassert os.environ['HOME'] == os.getcwd()").returncode == 0


# -- the network --------------------------------------------------------------------------------

@needs_bwrap
def test_no_socket_reaches_the_caller_or_beyond(listener):
    assert refused_by_os(attempt("socket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=2)", str(listener)))
    assert refused_by_os(attempt("socket.create_connection(('1.1.1.1', 53), timeout=2)"))
    result = attempt("print([name for _, name in socket.if_nameindex()])")
    assert result.returncode == 0 and result.stdout.decode().strip() == "['lo']", result
    connect = f"socket.create_connection(('127.0.0.1', {listener}), timeout=2)"
    assert not verify_code(candidate(connect), OPEN).passed


# -- other processes ----------------------------------------------------------------------------

@needs_bwrap
def test_the_trainers_process_is_not_visible():
    trainer = os.getpid()
    result = attempt("import json\n"
                     "print(json.dumps([os.getpid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit())]))")
    assert result.returncode == 0, result
    itself, pids = json.loads(result.stdout)
    assert pids == sorted({1, itself}), pids  # itself and bwrap's init, in a pid namespace of their own
    assert refused_by_os(attempt("os.kill(int(sys.argv[2]), 0)", str(trainer)))  # no such process there
    assert refused_by_os(attempt("open(f'/proc/{sys.argv[2]}/environ').read()", str(trainer)))
    for before in ("os.listdir('/proc')", f"os.kill({trainer}, 0)", f"open('/proc/{trainer}/cmdline').read()"):
        assert not verify_code(candidate(before), OPEN).passed, before


@needs_bwrap
def test_the_sandbox_dies_with_the_trainer(tmp_path):
    # A trainer killed mid-verification (SIGKILL: nothing of it runs) must not leave the candidate
    # running, whatever uid it runs as: here it sleeps, out of reach of its CPU limit.
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import dataclasses
        from grpoflow.verifiers import SandboxLimits, get_code_task, verify_code
        task = dataclasses.replace(get_code_task("sort_list"), allowed_imports=frozenset({"time"}),
                                   limits=SandboxLimits(wall_seconds=120))
        verify_code("import time\\ndef sort_list(xs):\\n    time.sleep(120)", task)
        """)], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)})  # what it leaves, pytest removes
    try:
        for _ in range(100):
            sandboxed = [p for p in descendants(trainer.pid) if b"_sandbox_child.py" in cmdline(p)]
            if sandboxed:
                break
            time.sleep(0.1)
        assert sandboxed, "the candidate never started"
        time.sleep(0.5)  # well into its sleep
    finally:
        trainer.kill()
        trainer.wait()
    for _ in range(50):
        if not any(alive(p) for p in sandboxed):
            break
        time.sleep(0.1)
    assert not any(alive(p) for p in sandboxed), "the candidate outlived the trainer"


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for task in os.listdir(f"/proc/{parent}/task")
                        for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
        except OSError:
            continue
        found += children
        todo += children
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie is dead
    except OSError:
        return False


# -- without bubblewrap -------------------------------------------------------------------------

def run_python(code: str, path: str) -> list[str]:
    """The lines `code` prints in a fresh interpreter (the probe is once per process) with PATH `path`."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, "PATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


VERIFY_TWICE = f"""
    from grpoflow.verifiers import allow_unsandboxed, get_code_task, isolation, verify_code
    from grpoflow.verifiers.sandbox import SandboxUnavailable
    SOURCE = {SELECTION_SORT!r}
    from grpoflow.rewards import RewardSet
    try:
        verify_code(SOURCE, get_code_task("sort_list"))
        print("ran")
    except SandboxUnavailable as e:
        print("refused:", e)
    print(isolation()[0])
    try:  # in a run, code_reward scores through a RewardSet, which must not turn this into None scores
        completion = "```python" + SOURCE + "```"
        scores = RewardSet(["grpoflow.verifiers:code_reward"]).score([""], [completion], task=["sort_list"])
        print("reward:", scores.totals)
    except SandboxUnavailable:
        print("reward: refused")
    allow_unsandboxed(True)
    print("allowed:", verify_code(SOURCE, get_code_task("sort_list")).passed)
"""


def test_without_any_isolation_candidates_run_only_when_allowed(tmp_path):
    # PATH without bwrap, unshare or setpriv: the machine of an ordinary user who has none of them
    lines = run_python(VERIFY_TWICE, str(tmp_path))
    assert lines[0].startswith("refused: code sandbox: no OS isolation works here (bubblewrap not found"), lines
    assert "apt-get install bubblewrap" in lines[0] and "verifier.allow_unsandboxed: true" in lines[0]
    assert lines[1].startswith("isolation: none")
    assert lines[1].endswith("runs refused unless verifier.allow_unsandboxed: true")
    assert lines[2:] == ["reward: refused", "allowed: True"]


def test_the_pipeline_takes_the_setting_from_verifier_allow_unsandboxed(tmp_path):
    """Inside a stage (where rewards score) the config's setting holds; after it, the process's own again."""
    run_a_stage = f"""
        from grpoflow.config import validate_config
        from grpoflow.verifiers import get_code_task, verify_code
        from stages import dag

        def verify():
            try:
                return str(verify_code({SELECTION_SORT!r}, get_code_task("sort_list")).passed)
            except Exception as e:
                return type(e).__name__

        dag._RUNNERS["prepare"] = lambda cfg, results, options: verify()  # a stage that scores
        for allowed in (False, True):
            cfg = validate_config({{"verifier": {{"allow_unsandboxed": allowed}}}})
            print(dag.run_stage("prepare", cfg, dag.Results()), verify())
    """
    assert run_python(run_a_stage, str(tmp_path / "no-tools")) == ["SandboxUnavailable SandboxUnavailable",
                                                                  "True SandboxUnavailable"]


def test_a_bubblewrap_that_cannot_start_is_passed_over_with_its_reason(tmp_path):
    # A stand-in for bwrap on a kernel without user namespaces: it knows its version, and fails.
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "bubblewrap 0.8.0" && exit 0\n'
                    'echo "bwrap: No permissions to create a new namespace" >&2\nexit 1\n')
    fake.chmod(0o755)
    lines = run_python(VERIFY_TWICE, f"{fake.parent}:/usr/bin:/bin")
    if os.geteuid() == 0:  # util-linux takes over, still with namespaces and a fresh uid
        assert lines[:3] == ["ran", "isolation: util-linux (unshare, setpriv, mount), as root", "reward: [1.0]"], lines
    else:
        assert lines[0].startswith("refused:") and "No permissions to create a new namespace" in lines[0], lines
    assert lines[-1] == "allowed: True"


def test_a_folder_the_layout_lacks_does_not_stop_the_util_linux_probe(monkeypatch):
    # The GPU machine's python (2026-12-06) names /opt/torch/.venv/local/lib/python3.12/dist-packages
    # among its site-packages, a folder that is not there: the probe's os.stat raised and every tool
    # call of the recipe failed before it ran.
    from grpoflow.verifiers import launchers

    with tempfile.TemporaryDirectory() as made:  # tmp_path sits in a folder only root enters
        root = Path(made)
        root.chmod(0o755)
        missing = root / "venv" / "local" / "lib" / "python3.12" / "dist-packages"
        (root / "open.py").write_text("")
        (root / "open.py").chmod(0o644)
        (root / "closed" / "lib").mkdir(parents=True)
        (root / "closed").chmod(0o700)
        assert launchers._closed_to_others([missing, root / "open.py"]) is (closed_ancestor(root) is not None)
        assert launchers._closed_to_others([missing, root / "closed" / "lib"]) is True
    folders = [*site.getsitepackages(), str(missing)]
    monkeypatch.setattr(launchers.site, "getsitepackages", lambda: folders)
    if os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "setpriv", "mount")):
        mode, reason = launchers._util_linux()
        assert mode is not None and mode.name == "util-linux", reason


def test_a_mechanism_whose_probe_raises_leaves_the_next_one_to_try(monkeypatch):
    from grpoflow.verifiers import launchers

    def _util_linux():  # as the probe met it on the GPU machine before the fix
        raise FileNotFoundError(2, "No such file or directory", "/opt/torch/.venv/local/lib/python3.12")

    monkeypatch.setattr(launchers, "_bubblewrap", lambda fresh_uid: (None, "bwrap not found"))
    monkeypatch.setattr(launchers, "_util_linux", _util_linux)
    launchers._probe.cache_clear()
    try:
        mode = launchers._probe()
    finally:
        launchers._probe.cache_clear()
    assert mode.name == "none"
    assert mode.reasons[-1].startswith("util_linux: probe failed ([Errno 2]"), mode.reasons


@needs_bwrap
def test_a_root_that_cannot_make_namespaces_itself_gets_a_user_namespace(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root makes the namespaces without a user namespace")
    # A stand-in for bwrap in a container's root, without CAP_SYS_ADMIN: only a user namespace works.
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncase " $* " in *" --version "*|*" --unshare-user "*) exec {shutil.which("bwrap")} "$@";;\n'
                    'esac\necho "bwrap: Creating new namespace failed: Operation not permitted" >&2\nexit 1\n')
    fake.chmod(0o755)
    lines = run_python(VERIFY_TWICE, f"{fake.parent}:/usr/bin:/bin")
    assert lines[0] == "ran" and lines[1].startswith("isolation: bubblewrap"), lines
    check = ("from grpoflow.verifiers import isolation, sandbox\nprint(isolation())\n"
             "said = sandbox.run_script('import os\\nos.close(os.open(\"/proc/sys/kernel/core_pattern\", os.O_WRONLY))')\n"
             "print((said.stderr.decode().strip().splitlines() or ['opened it'])[-1])")
    mechanisms, opened = run_python(check, f"{fake.parent}:/usr/bin:/bin")
    assert "this process's uid (0) in a user namespace that cannot make more of them" in mechanisms, mechanisms
    assert opened.startswith("OSError: [Errno 30] Read-only file system"), opened  # the host's sysctls stay out of reach


# -- the same tests, as an ordinary user ----------------------------------------------------------

def unused_uid() -> int:
    while True:
        uid = 1_900_000 + secrets.randbelow(100_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


def closed_ancestor(path: Path) -> Path | None:
    """The outermost folder above `path` that other users cannot enter, if any."""
    for folder in reversed(Path(path).resolve().parents):
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


@needs_bwrap
def test_the_same_tests_pass_as_an_ordinary_user():
    if os.geteuid() != 0:
        pytest.skip("only root reruns the tests as an ordinary user: this run is one")
    if closed_ancestor(ROOT / "tests") or closed_ancestor(Path(sys.prefix) / "bin"):
        pytest.skip(f"{ROOT} or {sys.prefix} is under a folder other users cannot enter")
    uid = unused_uid()
    user_dir = Path(tempfile.mkdtemp(prefix="grpoflow-ordinary-user-"))
    try:
        os.chown(user_dir, uid, uid)
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                   f"--basetemp={user_dir / 'pytest'}", "tests/test_code_sandbox.py",
                   "tests/test_code_verifier.py", "tests/test_code_verifier_escapes.py"]
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--"]
        install = Path(sys.base_prefix).resolve()
        closed = closed_ancestor(install / "bin")
        if closed is not None:
            # This interpreter lies under a folder others cannot enter (a pyenv under /root). An
            # ordinary user's own Python would not: in a mount namespace of its own, that folder
            # shows only the interpreter's install, so the user runs this same venv.
            stage = user_dir / "stage"
            stage.mkdir()
            show = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 grpoflow-user "$3" && '
                    'mkdir -p "$1" && mount --bind "$2" "$1" && shift 3 && exec "$@"')
            drop = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", show, "sh",
                    str(install), str(stage), str(closed), *drop]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(user_dir),
               "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([*drop, *command], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    finally:
        shutil.rmtree(user_dir, ignore_errors=True)
    summary = result.stdout.strip().splitlines()[-1:] or [result.stderr[-2000:]]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", summary[0]), summary
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("only root" in line for line in skipped), skipped  # only what an ordinary user cannot try
    print(f"as uid {uid}: {summary[0]}")
