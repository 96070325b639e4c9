"""What holds while candidate code runs: the task's rules, the audit hook, the result channel.

_sandbox_child.py execs this file into a dict of its own (it is never imported, so it is not in
sys.modules) and calls open_channel() when it starts and arm() just before the candidate's first
check. Nothing in here may rely on what the candidate can name. Attributes can be fetched by a
string the static check never sees (functools.update_wrapper, operator.attrgetter, match
patterns, str.format fields, descriptors...), and Python 3.11 audits only a few reads (frames,
__code__), so from its first line a candidate can reach any object in this interpreter: the
real builtins, sys, os, every loaded module, the harness's globals. The policy holds anyway:

1. What a task forbids is taken out of the interpreter, not hidden from the candidate. Every
   forbidden builtin, and every forbidden attribute of each loaded module and class, is
   replaced in every dict that holds it (the builtins module, module globals, the dict of a
   static type such as list) by a stand-in that refuses. Any route to list.sort ends at the
   stand-in, and so does a C function calling it (map(list.sort, ...)) or a library doing the
   work for the candidate (sorted() looks list.sort up). A forbidden data attribute (co_code,
   __closure__) becomes a property that refuses when read. The originals stay alive here only.
   (A profile hook, refusing calls by identity, would miss those last two: it sees a call to
   a C function only when Python code makes it. This costs nothing per call either.) So that
   nothing new can bring the originals back, a task that forbids names has every module it
   allows loaded before arm(), and no module loads afterwards.
2. The ways into this file's state are refused: frames (the audited reads, and signal
   handlers, which are handed one), gc, threads, re-created builtin modules, and loading a
   module the task does not allow.
3. This file depends on nothing the candidate can reach. Its globals are private, its builtins
   a snapshot, and it binds functions (C ones, nearly all), never modules: rebinding a module
   attribute, a builtin or a harness global from candidate code changes no verdict.

The parent judges values only. The nonce tags the lines this file writes, so that the
candidate's own writes to the channel show up as forged; it is out of the candidate's reach
(frames and gc are refused), but a pass never rests on it: a candidate that could tag lines
would still have to compute every checked value, and it sees one check's input at a time.

Stand-ins take a forbidden name away from everything that runs with the candidate, libraries
included: in sort_list, Counter.most_common and enum's auto() refuse too (both sort). That is
the point for a rule like "no sorting library"; forbid what the task is about, not what every
library uses.

CPython internals this relies on, checked on 3.11, 3.12 and 3.13: a class's __dict__ proxy
refers to the type's own dict (gc.get_referents); the setter of __abstractmethods__ calls
PyType_Modified, static types included; _imp.create_builtin re-creates a builtin module
without an "import" audit event; bytecode reads as names_in() reads it. take_away() checks
its work, and the child refuses to run on any other interpreter.
"""

from _stat import S_ISDIR, S_ISLNK
from gc import get_objects, get_referents, get_referrers
from opcode import EXTENDED_ARG, _inline_cache_entries, hasname, opmap, opname
from os import O_APPEND, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY, _exit, getcwd, lstat, readlink, stat, write
from sys import addaudithook, audit, getfilesystemencoding, version_info

EXIT_REFUSED = 3
FS_ENCODING = getfilesystemencoding()
# How to read bytecode, as dis does (3.11 to 3.13), in tuples of our own: dis itself calls
# builtins a task may have taken away (3.13 sorts jump labels).
HASNAME = frozenset(op for op in hasname if op < 256)
OPNAMES = tuple(opname)
CACHE_ENTRIES = tuple(_inline_cache_entries.get(opname[op], 0) if type(_inline_cache_entries) is dict
                      else _inline_cache_entries[op] for op in range(256))
NAME_INDEX_SHIFTS = {opmap["LOAD_GLOBAL"]: 1} | (
    {opmap["LOAD_ATTR"]: 1, opmap["LOAD_SUPER_ATTR"]: 2} if version_info >= (3, 12) else {})
ABSTRACT = type.__dict__["__abstractmethods__"]
CODE_BYTES = type((lambda: 0).__code__).__dict__["co_code"]  # names_in reads it after a task takes co_code away
TYPE_DICT = type.__dict__["__dict__"]  # a class's own namespace, whatever its metaclass says

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
# JSON string escapes: quotes, backslashes, control characters, and lone surrogates (which
# UTF-8 cannot carry).
JSON_ESCAPES = {c: f"\\u{c:04x}" for c in [*range(0x20), *range(0xD800, 0xE000)]} | {ord('"'): '\\"', ord("\\"): "\\\\"}
STAND_IN = "def refused(*args, **kwargs):\n    audit('grpoflow.forbidden', kind, detail)\n"
TAKEN = []  # the originals take_away() replaced: alive (a cached lookup may still point at one), out of reach


class FrameRefused(ValueError):
    """Raised, not fatal: namedtuple, typing and enum ask for their caller's frame to name a
    module and fall back cleanly on ValueError. Candidates get no frame either."""


def is_dunder(name):
    return name.startswith("__") and name.endswith("__") and len(name) > 4


# -- the result channel -----------------------------------------------------------------------

def open_channel(nonce, fd):
    """send(record) writes one nonce-tagged line on the result channel; refuse(kind, detail)
    sends a violation and ends the process on the spot, so candidate code cannot catch it."""

    def quote(text):
        return '"' + text.translate(JSON_ESCAPES) + '"'

    def encode(record):  # records hold str and int values only; JSON without the json module
        fields = []
        for key, value in record.items():
            text = quote(value) if type(value) is str else int.__repr__(value) if type(value) is int else "null"
            fields.append(quote(key) + ": " + text)
        return "{" + ", ".join(fields) + "}"

    def send(record):
        data = (nonce + "\t" + encode(record) + "\n").encode()
        while data:
            data = data[write(fd, data):]

    def refuse(kind, detail):
        try:
            send({"violation": kind, "detail": detail[:300]})
        finally:
            _exit(EXIT_REFUSED)

    return send, refuse


# -- taking forbidden callables out of the interpreter ---------------------------------------

def stand_in(kind, detail):
    """What a forbidden callable is replaced by. Its globals hold sys.audit and two strings, so
    reaching it leads nowhere; muting it leaves the caller with nothing that works."""
    namespace = {"__builtins__": {}, "audit": audit, "kind": kind, "detail": detail}
    exec(STAND_IN, namespace)
    return namespace["refused"]


def all_classes():
    seen, todo = {id(object): object}, [object]
    while todo:
        for sub in type.__subclasses__(todo.pop()):
            if id(sub) not in seen:
                seen[id(sub)] = sub
                todo.append(sub)
    return list(seen.values())


def refresh(cls):
    """Make CPython drop what it cached about cls (PyType_Modified) after its dict was edited
    behind its back. The __abstractmethods__ setter does that, on static types too. Without it,
    a lookup specialised earlier keeps calling the old object, or a freed one."""
    try:
        ABSTRACT.__set__(cls, ABSTRACT.__get__(cls))  # a real ABC keeps its value
    except AttributeError:
        ABSTRACT.__set__(cls, frozenset())
        ABSTRACT.__delete__(cls)


def forbidden_callables(policy):
    """(object, owner, name, kind, detail) for everything to take away: the task's forbidden
    builtins and attributes, and what no task grants (signal handlers, threads, builtin modules
    re-created from their first copy: a fresh _signal would bring signal() back)."""
    import _imp, _signal, _thread, builtins, sys

    found = [(getattr(builtins, name), builtins, name, "forbidden_import", f"builtin {name!r} is not allowed in this task")
             for name in policy["forbidden_builtins"] if hasattr(builtins, name)]
    names = policy["forbidden_attributes"]
    if names:
        namespaces = [(cls, TYPE_DICT.__get__(cls)) for cls in all_classes()]
        namespaces += [(m, vars(m)) for m in list(sys.modules.values()) if type(getattr(m, "__dict__", None)) is dict]
        for owner, namespace in namespaces:
            found += [(namespace[name], owner, name, "forbidden_import", f".{name} is not allowed in this task")
                      for name in names & namespace.keys()
                      if not isinstance(namespace[name], (type, type(sys)))]  # functions, not a module named bisect
    found.append((_signal.signal, _signal, "signal", "forbidden_io", "signal handlers are not available in the sandbox"))
    found += [(getattr(_thread, name), _thread, name, "forbidden_io", "threads are not available in the sandbox")
              for name in ("start_new_thread", "start_new", "start_joinable_thread") if hasattr(_thread, name)]
    found.append((_imp.create_builtin, _imp, "create_builtin", "forbidden_import",
                  "builtin modules cannot be created once the checks run"))
    return found


def take_away(policy):
    """Replace every forbidden callable, in every dict that holds it, by a stand-in that refuses.

    The originals go to TAKEN. Raises RuntimeError when one is held where no stand-in can go
    (a tuple, a cell, a bound method), or when a lookup still finds it afterwards: then the
    sandbox cannot keep the task's rules, and says so rather than run. (No closure in here
    refers to an original, or its cell would be one more holder.)
    """
    private = globals()
    found = forbidden_callables(policy)
    class_dicts = {id(get_referents(TYPE_DICT.__get__(cls))[0]): cls for cls in all_classes()}
    own = {id(TAKEN), id(found), *map(id, found)}
    taken, touched = set(), []
    for obj, owner, name, kind, detail in found:
        if id(obj) in taken:
            continue
        taken.add(id(obj))
        TAKEN.append(obj)
        replacement = stand_in(kind, detail)
        if type(obj).__name__ in ("getset_descriptor", "member_descriptor"):
            replacement = property(replacement)  # a data attribute (co_code, __closure__): refused when read
        for holder in get_referrers(obj):
            if id(holder) in own or type(holder).__name__ == "frame":
                continue
            if type(holder) is not dict:
                raise RuntimeError(f"{owner!r}.{name} is also held by a {type(holder).__name__}")
            if holder is private or holder is private["__builtins__"]:
                continue  # this file's own copies: out of reach, and it may need them
            for key, value in list(holder.items()):
                if value is obj:
                    holder[key] = replacement
            cls = class_dicts.get(id(holder))
            if cls is type:
                raise RuntimeError(f"type.{name} cannot be taken away")
            if cls is not None:
                touched.append(cls)
    for cls in touched:
        refresh(cls)
    for obj, owner, name, kind, detail in found:
        if id(getattr(owner, name)) in taken:
            raise RuntimeError(f"{owner!r}.{name} is still found after being replaced")
    # A bound C method holds the C function, not the descriptor, so get_referrers misses it.
    methods = {(m.__name__, m.__objclass__) for m in TAKEN if type(m).__name__ == "method_descriptor"}
    for bound in get_objects() if methods else ():
        if type(bound).__name__ == "builtin_function_or_method" and (bound.__name__, type(bound.__self__)) in methods:
            raise RuntimeError(f"a bound {bound.__name__} method was made before the checks")


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


def arm(refuse, policy, candidate_code, sandbox_dir, read_roots, safe_dunders):
    """Take the task's forbidden names out of the interpreter and start refusing; from here on
    only the audit hook, the stand-ins and this file's closures stand between candidate code
    and everything else."""
    import sys

    loaded = frozenset(sys.modules)
    take_away(policy)
    if "gc" not in policy["allowed_imports"]:
        sys.modules.pop("gc", None)  # imported here; `import gc` must find nothing to hand out
    addaudithook(make_hook(refuse, policy, candidate_code, sandbox_dir, read_roots, loaded, safe_dunders))
