"""The audit hook that _sandbox_guard.py arms: the events it refuses, and how it checks the others.

Like the guard, this file is never imported: _sandbox_child.py execs it and then _sandbox_guard.py
into one dict of their own, so the two share private globals and one snapshot of the builtins, and
the guard's docstring holds here too: this file binds functions, never modules, and relies on
nothing the candidate can reach. It only defines; nothing here runs until arm() adds the hook
make_hook() returns. Files are judged by where they really are (real_path), modules by the file
their code comes from, and code compiled at run time by the names its bytecode uses (names_in,
which reads bytecode as dis does: tests/test_code_verifier_escapes.py checks that it agrees).
"""

from _stat import S_ISDIR, S_ISLNK
from opcode import EXTENDED_ARG, _inline_cache_entries, hasname, opmap, opname
from os import O_APPEND, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY, getcwd, lstat, readlink, stat
from sys import getfilesystemencoding, version_info

FS_ENCODING = getfilesystemencoding()
# How to read bytecode, as dis does (3.11 to 3.13), in tuples of our own: dis itself calls
# builtins a task may have taken away (3.13 sorts jump labels).
HASNAME = frozenset(op for op in hasname if op < 256)
OPNAMES = tuple(opname)
CACHE_ENTRIES = tuple(_inline_cache_entries.get(opname[op], 0) if type(_inline_cache_entries) is dict
                      else _inline_cache_entries[op] for op in range(256))
NAME_INDEX_SHIFTS = {opmap["LOAD_GLOBAL"]: 1} | (
    {opmap["LOAD_ATTR"]: 1, opmap["LOAD_SUPER_ATTR"]: 2} if version_info >= (3, 12) else {})
CODE_BYTES = type((lambda: 0).__code__).__dict__["co_code"]  # names_in reads it after a task takes co_code away

# Names that code compiled at run time may use. namedtuple and dataclasses build methods from
# string templates; typing evaluates annotation strings, in whatever module's globals a class
# claims to come from. The templates look up only these globals (measured on 3.11), so any other
# private name (_sys, _os...), a module's name, or a reflective builtin in run-time code is a detour.
REFLECTIVE_NAMES = frozenset({
    "eval", "exec", "compile", "globals", "locals", "vars", "getattr", "setattr", "delattr",
    "breakpoint", "input", "open", "memoryview", "__import__", "__builtins__",
})
RUNTIME_GLOBALS_OK = frozenset({"_tuple_new"})
RUNTIME_DUNDERS_EXTRA = frozenset({"__create_fn__", "__setattr__", "__delattr__", "__post_init__"})
ATTRIBUTE_OPCODES = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR", "STORE_ATTR", "DELETE_ATTR", "IMPORT_FROM"})
# Top-level modules any task may load while the checks run: a compiler directive, and codecs
# with what the idna codec needs (socket encodes every host name with it). Pure data.
ALWAYS_LOADABLE = frozenset({"__future__", "encodings", "stringprep", "unicodedata"})
# Audit events refused outright, by the kind of verdict they lead to.
REFUSED_EVENTS = {
    "forbidden_io": frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
        "os.chdir", "os.fchdir", "os.chroot", "os.symlink", "os.link", "os.mkfifo", "os.mknod",
        "resource.setrlimit", "resource.prlimit", "webbrowser.open", "_thread.start_new_thread",
    }),
    "forbidden_code": frozenset({
        "sys._current_frames", "sys._current_exceptions", "sys.settrace",
        "sys.setprofile", "sys.addaudithook", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "function.__new__", "code.__new__", "cpython.run_command",
        "cpython.run_file", "cpython.run_module", "cpython.run_startup",
        "cpython.run_interactivehook", "cpython._PySys_ClearAuditHooks",
        "sys.monitoring.register_callback",
    }),
}
REFUSED_PREFIXES = (
    "socket.", "ctypes.", "mmap.", "sqlite3.", "dbm.", "fcntl.", "syslog.", "urllib.", "http.client.",
    "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.", "_winapi.", "winreg.",
)
# os.* events that change the file system: their path arguments must lie in the sandbox dir.
WRITE_PATH_EVENTS = {
    "os.chmod": (0,), "os.chown": (0,), "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,),
    "os.rename": (0, 1), "os.utime": (0,), "os.truncate": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,),
}
WRITE_FLAGS = O_WRONLY | O_RDWR | O_APPEND | O_CREAT | O_TRUNC
READABLE_DEVICES = frozenset({"/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"})


class FrameRefused(ValueError):
    """Raised, not fatal: namedtuple, typing and enum ask for their caller's frame to name a
    module and fall back cleanly on ValueError. Candidates get no frame either."""


def is_dunder(name):
    return name.startswith("__") and name.endswith("__") and len(name) > 4


# -- the audit hook ----------------------------------------------------------------------------

def real_path(path):
    """os.path.realpath from C calls only (lstat, readlink, getcwd), so nothing the candidate
    rebinds in posixpath changes the answer. Links resolve the way the kernel resolves them."""
    todo = (getcwd().split("/") if not path.startswith("/") else []) + path.split("/")
    todo.reverse()
    done, hops = [], 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join(done + [name])
        try:
            link = S_ISLNK(lstat(here).st_mode)
        except OSError:
            link = False
        if not link:
            done.append(name)
            continue
        hops += 1
        if hops > 40:
            raise OSError(f"too many symbolic links under {here}")
        target = readlink(here)
        if target.startswith("/"):
            done = []
        todo.extend(reversed(target.split("/")))
    return "/" + "/".join(done)


def names_in(code):
    """(opname, name) for each instruction of code that names something, read as dis reads them."""
    raw, extended, skip = CODE_BYTES.__get__(code), 0, 0
    for i in range(0, len(raw), 2):
        if skip:  # inline cache entries
            skip -= 1
            continue
        op, arg = raw[i], raw[i + 1] | extended
        extended = arg << 8 if op == EXTENDED_ARG else 0
        skip = CACHE_ENTRIES[op]
        if op in HASNAME:
            yield OPNAMES[op], code.co_names[arg >> NAME_INDEX_SHIFTS.get(op, 0)]


def is_dir(path):
    try:
        return S_ISDIR(stat(path).st_mode)
    except OSError:
        return False


def make_hook(refuse, policy, candidate_code, sandbox_dir, read_roots, loaded, safe_dunders):
    allowed = policy["allowed_imports"]
    allowed_text = ", ".join(sorted(policy["allowed_imports"]))
    task_forbidden = policy["forbidden_builtins"] | policy["forbidden_attributes"]
    loads_allowed = not task_forbidden  # see the module docstring, point 1
    runtime_dunders = safe_dunders | RUNTIME_DUNDERS_EXTRA
    roots_deepest_first = tuple(sorted(read_roots, key=len, reverse=True))

    def inside(path, roots):
        return any(path == root or path.startswith(root + "/") for root in roots)

    def resolve(path, event):
        # Exact types only: a str subclass or a PathLike could answer differently here than
        # when the real call converts it a moment later.
        if type(path) is str:
            return real_path(path)
        if type(path) is bytes:
            return real_path(path.decode(FS_ENCODING, "surrogateescape"))
        refuse("forbidden_io", f"{event} on {type(path).__name__} {path!r:.80}; only str paths are allowed")

    def check_write(path, event):
        real = resolve(path, event)
        if not inside(real, (sandbox_dir,)):
            refuse("forbidden_io", f"{event}: writing {path!r:.120} outside the sandbox dir")

    def check_read(path, event, directory):
        real = resolve(path, event)
        if inside(real, (sandbox_dir,)):
            return
        if real in READABLE_DEVICES or (inside(real, read_roots) and (directory or not is_dir(real))):
            return  # a directory fd outside the sandbox would let dir_fd= calls dodge the path check
        refuse("forbidden_io", f"{event}: reading {path!r:.120} outside the sandbox dir and the stdlib")

    def check_load(module):
        if type(module) is not str:
            refuse("forbidden_import", f"import of a {type(module).__name__}")
        if module.partition(".")[0] in ALWAYS_LOADABLE:
            return
        if not loads_allowed:
            refuse("forbidden_import", f"loading module {module!r} while the checks run: this task forbids "
                                       "names, so the modules it allows are loaded before")
        if module.partition(".")[0] not in allowed:
            refuse("forbidden_import", f"import of {module!r}; this task allows {allowed_text}")

    def module_of(filename):
        """The module a file of the stdlib (or an allowed package) belongs to, or None."""
        if filename.startswith("<frozen "):
            return filename[len("<frozen "):-1]
        for root in roots_deepest_first:
            if inside(filename, (root,)) and filename != root:
                return filename[len(root) + 1:].partition("/")[0].removesuffix(".py")
        return None

    def check_runtime_code(code):
        stack = [code]
        while stack:
            c = stack.pop()
            for op, name in names_in(c):
                if name in task_forbidden:
                    refuse("forbidden_import", f"code compiled at run time uses {name!r}, which this task forbids")
                if is_dunder(name):
                    bad = name not in runtime_dunders
                elif op in ATTRIBUTE_OPCODES:
                    bad = False  # field names of namedtuples and dataclasses, as self.<name>
                else:
                    bad = name in REFLECTIVE_NAMES or name in loaded or (name.startswith("_") and name not in RUNTIME_GLOBALS_OK)
                if bad:
                    refuse("forbidden_code", f"code compiled at run time uses {name!r}")
            stack.extend(k for k in c.co_consts if type(k) is type(code))

    def check_exec(code):
        if code is candidate_code:
            return
        module = module_of(code.co_filename)
        if module is None:
            check_runtime_code(code)
        elif code.co_name == "<module>":  # a module's body: a module is loading, however it was asked for
            check_load(module)

    def hook(event, args):
        try:
            if event == "open":
                path, mode, flags = args
                if type(flags) is not int:
                    refuse("forbidden_io", "open() with non-int flags")
                if flags & WRITE_FLAGS:
                    check_write(path, "open")
                else:
                    check_read(path, "open", directory=False)
            elif event == "exec":
                check_exec(args[0])
            elif event == "import":
                check_load(args[0])
            elif event in ("os.listdir", "os.scandir"):
                check_read("." if args[0] is None else args[0], event, directory=True)
            elif event in WRITE_PATH_EVENTS:
                for i in WRITE_PATH_EVENTS[event]:
                    check_write(args[i], event)
            elif event == "sys._getframe":
                raise FrameRefused("stack frames are not available in the sandbox")
            elif event == "object.__getattr__":
                if type(args[1]) is not str or args[1].endswith("frame"):
                    refuse("forbidden_code", f"reading .{args[1]} (stack frames are off limits)")
            elif event == "object.__setattr__":
                if args[1] == "__code__":
                    refuse("forbidden_code", "replacing a function's __code__")
            elif event in ("marshal.dump", "marshal.dumps") and not loads_allowed:
                # the bytes of a code object show its variables in the compiler's (sorted) order;
                # nothing loads once the checks run, so nothing writes a .pyc
                refuse("forbidden_code", f"{event} is not available in a task that forbids names")
            elif event == "grpoflow.forbidden":
                kind, detail = args[0], args[1]
                refuse(kind if type(kind) is str else "forbidden_code", detail if type(detail) is str else "refused")
            elif event.startswith(REFUSED_PREFIXES):
                refuse("forbidden_io", f"{event} (network and native code are off limits)")
            else:
                for kind, events in REFUSED_EVENTS.items():
                    if event in events:
                        refuse(kind, f"{event} is not allowed in the sandbox")
        except FrameRefused:
            raise
        except Exception as e:  # a check that breaks must refuse, never wave the event through
            refuse("forbidden_io", f"sandbox could not check audit event {event!r}: {type(e).__name__}")

    return hook
