"""The child side of the code sandbox: run one candidate against a batch of inputs, send back values.

sandbox.py starts this file as `python -I -S -B _sandbox_child.py`, inside fresh namespaces and
as an unprivileged uid where it can. It is self-contained on purpose (stdlib only): nothing of
grpoflow is importable in here, and nothing in here knows the expected answers.

The order of main() is the design:
  1. read the job from stdin: source, inputs, the task's policy, the result fd and its nonce;
  2. check the source statically (syntax, forbidden imports and names);
  3. import what the source imports, while imports are still free, then lower the rlimits;
  4. arm the audit hook. From here every file, network, process and introspection event is
     checked, and a refusal ends the process on the spot, so candidate code cannot catch it;
  5. for each check: exec the source into fresh globals, call the entry point, send the value.

The parent judges correctness; the child only ever reports values. Every line on the result fd
starts with a nonce held in main()'s locals and the hook's closure, both out of the candidate's
reach (frames and gc are refused), so a candidate that writes to the fd cannot forge a line.
"""

import ast
import builtins
import json
import os
import resource
import sys
import types
from dis import get_instructions, hasname

EXIT_REFUSED = 3

# Builtins plain algorithm code needs. Left out: eval/exec/compile/globals/locals/vars (ways
# around the static check), input/breakpoint/help (interactive), and getattr & co., which come
# back below in guarded form. Task-forbidden builtins (e.g. `sorted`) are removed per task.
SAFE_BUILTINS = frozenset({
    "abs", "aiter", "all", "anext", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable",
    "chr", "classmethod", "complex", "dict", "dir", "divmod", "enumerate", "filter", "float", "format",
    "frozenset", "hash", "hex", "id", "int", "isinstance", "issubclass", "iter", "len", "list", "map",
    "max", "memoryview", "min", "next", "object", "oct", "open", "ord", "pow", "print", "property",
    "range", "repr", "reversed", "round", "set", "slice", "sorted", "staticmethod", "str", "sum",
    "super", "tuple", "type", "zip", "True", "False", "None", "Ellipsis", "NotImplemented",
})
# Dunders that ordinary code touches. Every other __x__ attribute (__globals__, __subclasses__,
# __builtins__, __self__, __code__, __dict__...) is a classic way out of a restricted namespace.
SAFE_DUNDERS = frozenset({
    "__init__", "__name__", "__qualname__", "__doc__", "__class__", "__slots__", "__all__",
    "__len__", "__iter__", "__next__", "__contains__", "__getitem__", "__setitem__", "__delitem__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__repr__", "__str__",
    "__add__", "__sub__", "__mul__", "__bool__", "__debug__",
})
# Code compiled at run time. namedtuple and dataclasses build methods from string templates;
# typing evaluates annotation strings, in whatever module's globals a class claims to come
# from. The templates look up only these globals (measured on 3.11), so any other private name
# (_sys, _os...), a module's name, or a reflective builtin in run-time code is a detour.
REFLECTIVE_NAMES = frozenset({
    "eval", "exec", "compile", "globals", "locals", "vars", "getattr", "setattr", "delattr",
    "breakpoint", "input", "open", "memoryview", "__import__", "__builtins__",
})
RUNTIME_GLOBALS_OK = frozenset({"_tuple_new"})
RUNTIME_DUNDERS_OK = SAFE_DUNDERS | {"__create_fn__", "__setattr__", "__delattr__", "__post_init__"}
ATTRIBUTE_OPCODES = frozenset({"LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR", "IMPORT_FROM"})
# Public names of allowed modules that reach around the static check: string attribute access
# (attrgetter, Formatter.get_field) and typing's evaluators of annotation strings.
HIDDEN_MODULE_ATTRIBUTES = frozenset({
    "operator.attrgetter", "operator.methodcaller", "string.Formatter",
    "typing.get_type_hints", "typing.get_args", "typing.ForwardRef",
})
# Modules whose views carry only these names. sys is the common case: solutions call
# sys.setrecursionlimit, and sys.modules would hand out every module there is.
MODULE_ATTRIBUTE_ALLOWLISTS = {
    "sys": frozenset({
        "setrecursionlimit", "getrecursionlimit", "maxsize", "float_info", "int_info", "version_info",
        "hexversion", "byteorder", "intern", "getsizeof", "exit", "stdout", "stderr",
        "set_int_max_str_digits", "get_int_max_str_digits",
    }),
}
# Capability modules refused even through a stdlib detour, unless the task allows them by name.
DANGEROUS_MODULES = frozenset({
    "ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing",
    "socket", "_socket", "ssl", "_ssl", "asyncio", "pty", "fcntl", "mmap", "threading",
    "_xxsubinterpreters", "concurrent", "signal", "resource", "gc", "inspect", "marshal",
})
# Audit events refused outright, by the kind of verdict they lead to.
REFUSED_EVENTS = {
    "forbidden_io": frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
        "os.chdir", "os.fchdir", "os.chroot", "os.symlink", "os.link", "os.mkfifo", "os.mknod",
        "resource.setrlimit", "resource.prlimit", "webbrowser.open",
    }),
    "forbidden_code": frozenset({
        "sys._current_frames", "sys._current_exceptions", "sys.settrace",
        "sys.setprofile", "sys.addaudithook", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "function.__new__", "code.__new__", "cpython.run_command",
        "cpython.run_file", "cpython.run_module", "cpython.run_startup",
        "cpython.run_interactivehook", "cpython._PySys_ClearAuditHooks",
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
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
READABLE_DEVICES = frozenset({"/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"})


class FrameRefused(ValueError):
    pass


def forbid(kind, detail):
    """Refuse from candidate-reachable helpers: the audit hook turns this event into a verdict."""
    sys.audit("grpoflow.forbidden", kind, detail)
    raise ImportError(detail)  # only reached before the hook is armed


def allowed_imports(policy):
    # __future__ is a compiler directive (`from __future__ import annotations`), not a library.
    return policy["allowed_imports"] | {"__future__"}


def is_dunder(name):
    return name.startswith("__") and name.endswith("__") and len(name) > 4


# -- static check ---------------------------------------------------------------------------

def bound_names(tree):
    """Names the source binds itself: a local `sorted = ...` is its own, not the builtin."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
    return names


def imported_modules(tree):
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def find_forbidden(tree, policy):
    """(kind, message) for the first thing the task's policy refuses, or None."""
    own = bound_names(tree)
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and node.level:
                return "forbidden_import", f"{where}: relative import"
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in modules:
                if module.partition(".")[0] not in allowed_imports(policy):
                    return "forbidden_import", f"{where}: import of {module!r}; this task allows {sorted(policy['allowed_imports'])}"
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if is_dunder(alias.name) and alias.name not in SAFE_DUNDERS:
                        return "forbidden_code", f"{where}: import of name {alias.name!r}"
        elif isinstance(node, ast.MatchClass):  # `case C(attr=x)` reads C's attributes by name
            for attr in node.kwd_attrs:
                if is_dunder(attr) and attr not in SAFE_DUNDERS:
                    return "forbidden_code", f"{where}: attribute {attr!r} in a class pattern"
                if attr in policy["forbidden_attributes"]:
                    return "forbidden_import", f"{where}: .{attr} is not allowed in this task"
        elif isinstance(node, ast.Name):
            if is_dunder(node.id) and node.id not in SAFE_DUNDERS:
                return "forbidden_code", f"{where}: name {node.id!r}"
            if node.id in policy["forbidden_builtins"] and node.id not in own:
                return "forbidden_import", f"{where}: builtin {node.id!r} is not allowed in this task"
        elif isinstance(node, ast.Attribute):
            if is_dunder(node.attr) and (node.attr not in SAFE_DUNDERS or not isinstance(node.ctx, ast.Load)):
                return "forbidden_code", f"{where}: attribute {node.attr!r}"
            if node.attr in policy["forbidden_attributes"]:
                return "forbidden_import", f"{where}: .{node.attr} is not allowed in this task"
    return None


# -- what the candidate's globals see ---------------------------------------------------------

def module_view(module, policy, memo):
    """A copy of a module's public names, minus modules the task does not allow.

    The real module stays out of reach, so `typing.sys.modules` or `collections._sys` lead
    nowhere, and attributes a candidate sets on its copy die with the check.
    """
    name = module.__name__
    if name in memo:
        return memo[name]
    view = memo[name] = types.ModuleType(name, getattr(module, "__doc__", None))
    only = MODULE_ATTRIBUTE_ALLOWLISTS.get(name)
    for attr, value in list(vars(module).items()):
        if attr.startswith("_") or f"{name}.{attr}" in HIDDEN_MODULE_ATTRIBUTES or (only and attr not in only):
            continue
        if isinstance(value, types.ModuleType):
            allowed = value.__name__.partition(".")[0] in policy["allowed_imports"]
            if not (allowed or sys.modules.get(f"{name}.{attr}") is value):
                continue
            value = module_view(value, policy, memo)
        setattr(view, attr, value)
    return view


def restricted_builtins(policy, real_import):
    views = {}  # one set of module views per check

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            forbid("forbidden_import", f"relative import of {name!r}")
        if type(name) is not str or name.partition(".")[0] not in allowed_imports(policy):
            forbid("forbidden_import", f"import of {name!r}; this task allows {sorted(policy['allowed_imports'])}")
        top = real_import(name, None, None, fromlist, 0)
        return module_view(sys.modules[name] if fromlist else top, policy, views)

    def checked(name):
        if type(name) is not str:  # exact type: a str subclass could lie to startswith()
            raise TypeError("attribute name must be a str")
        if is_dunder(name) and name not in SAFE_DUNDERS:
            forbid("forbidden_code", f"attribute {name!r} through getattr()")
        if name in policy["forbidden_attributes"]:
            forbid("forbidden_import", f".{name} is not allowed in this task (through getattr())")
        return name

    def safe_getattr(obj, name, *default):
        return getattr(obj, checked(name), *default)

    def safe_hasattr(obj, name):
        return hasattr(obj, checked(name))

    def safe_setattr(obj, name, value):
        setattr(obj, checked(name), value)

    def safe_delattr(obj, name):
        delattr(obj, checked(name))

    table = {n: getattr(builtins, n) for n in SAFE_BUILTINS - policy["forbidden_builtins"] if hasattr(builtins, n)}
    table.update({n: v for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)})
    table.update(__build_class__=builtins.__build_class__, __import__=guarded_import, getattr=safe_getattr,
                 hasattr=safe_hasattr, setattr=safe_setattr, delattr=safe_delattr)
    return table


# -- the audit hook ----------------------------------------------------------------------------

def make_audit_hook(refuse, candidate_code, policy, sandbox_dir, read_roots):
    realpath, isdir, fsdecode = os.path.realpath, os.path.isdir, os.fsdecode
    refused_modules = DANGEROUS_MODULES - policy["allowed_imports"]
    task_forbidden = policy["forbidden_builtins"] | policy["forbidden_attributes"]

    def inside(path, roots):
        return any(path == root or path.startswith(root + os.sep) for root in roots)

    def resolve(path, event):
        # Exact types only: a str subclass or a PathLike could answer differently here than
        # when the real call converts it a moment later.
        if type(path) is str:
            return realpath(path)
        if type(path) is bytes:
            return realpath(fsdecode(path))
        refuse("forbidden_io", f"{event} on {type(path).__name__} {path!r:.80}; only str paths are allowed")

    def check_write(path, event):
        real = resolve(path, event)
        if not inside(real, (sandbox_dir,)):
            refuse("forbidden_io", f"{event}: writing {path!r:.120} outside the sandbox dir")

    def check_read(path, event, directory):
        real = resolve(path, event)
        if inside(real, (sandbox_dir,)):
            return
        if real in READABLE_DEVICES or (inside(real, read_roots) and (directory or not isdir(real))):
            return  # a directory fd outside the sandbox would let dir_fd= calls dodge the path check
        refuse("forbidden_io", f"{event}: reading {path!r:.120} outside the sandbox dir and the stdlib")

    def check_runtime_code(code):
        stack = [code]
        while stack:
            c = stack.pop()
            for instruction in get_instructions(c):
                name = instruction.argval
                if instruction.opcode not in hasname or type(name) is not str:
                    continue
                if name in task_forbidden:
                    refuse("forbidden_import", f"code compiled at run time uses {name!r}, which this task forbids")
                if is_dunder(name):
                    bad = name not in RUNTIME_DUNDERS_OK
                elif instruction.opname in ATTRIBUTE_OPCODES:
                    bad = False  # field names of namedtuples and dataclasses, as self.<name>
                else:
                    bad = (name in REFLECTIVE_NAMES or name in sys.modules
                           or (name.startswith("_") and name not in RUNTIME_GLOBALS_OK))
                if bad:
                    refuse("forbidden_code", f"code compiled at run time uses {name!r}")
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))

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
                code = args[0]
                filename = code.co_filename
                if code is candidate_code or filename.startswith("<frozen "):
                    return
                if inside(filename, read_roots) and not filename.startswith("<"):
                    return  # a module imported lazily from the stdlib (or an allowed package)
                check_runtime_code(code)
            elif event == "import":
                if args[0].partition(".")[0] in refused_modules:
                    refuse("forbidden_import", f"import of {args[0]!r} (a capability module)")
            elif event in ("os.listdir", "os.scandir"):
                check_read("." if args[0] is None else args[0], event, directory=True)
            elif event in WRITE_PATH_EVENTS:
                for i in WRITE_PATH_EVENTS[event]:
                    check_write(args[i], event)
            elif event == "sys._getframe":
                # Raised, not fatal: namedtuple, typing and enum ask for their caller's frame to
                # name a module and fall back cleanly on ValueError. Candidates get no frame either.
                raise FrameRefused("stack frames are not available in the sandbox")
            elif event == "object.__getattr__":
                if type(args[1]) is not str or args[1].endswith("frame"):
                    refuse("forbidden_code", f"reading .{args[1]} (stack frames are off limits)")
            elif event == "object.__setattr__":
                if args[1] == "__code__":
                    refuse("forbidden_code", "replacing a function's __code__")
            elif event == "grpoflow.forbidden":
                refuse(str(args[0]), str(args[1]))
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


# -- running the checks ------------------------------------------------------------------------

def describe(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:300]
    except BaseException:  # a candidate's exception may fail to print itself
        return type(exc).__name__


def run_check(index, code, args, entry_point, policy, real_import):
    """One check in fresh globals, so nothing a previous check stored can be read back."""
    try:
        namespace = {"__builtins__": restricted_builtins(policy, real_import), "__name__": "candidate"}
        exec(code, namespace)
        fn = namespace.get(entry_point)
        if not callable(fn):
            return {"check": index, "error": "crashed", "detail": f"the code defines no function {entry_point!r}"}
        value = fn(*args)
    except MemoryError:
        return {"check": index, "error": "memory", "detail": "MemoryError"}
    except BaseException as e:  # SystemExit too: leaving early is a failed check, not a pass
        return {"check": index, "error": "crashed", "detail": describe(e)}
    try:
        return {"check": index, "value": json.dumps(value)}
    except MemoryError:
        return {"check": index, "error": "memory", "detail": "MemoryError while encoding the result"}
    except BaseException as e:
        return {"check": index, "error": "bad_output", "detail": f"result is not JSON: {describe(e)}"}


def set_limits(limits):
    cpu = limits["cpu_seconds"]
    # soft == hard: as pid 1 of its namespace the child ignores SIGXCPU, so the hard limit's
    # SIGKILL is what stops a busy loop; the parent reads the CPU time to call it a timeout.
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, limits["file_bytes"]), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def main():
    job = json.loads(sys.stdin.buffer.read())
    os.close(0)
    nonce, fd = job.pop("nonce"), job["channel_fd"]
    write, exit_now, dumps = os.write, os._exit, json.dumps

    def send(record):
        data = (nonce + "\t" + dumps(record) + "\n").encode()
        while data:
            data = data[write(fd, data):]

    def refuse(kind, detail):
        try:
            send({"violation": kind, "detail": detail[:300]})
        finally:
            exit_now(EXIT_REFUSED)

    policy = {key: frozenset(job[key]) for key in ("allowed_imports", "forbidden_builtins", "forbidden_attributes")}
    sandbox_dir = os.path.realpath(job["sandbox_dir"])
    os.chdir(sandbox_dir)
    sys.path.extend(job["extra_sys_path"])
    read_roots = tuple(sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}))

    try:
        tree = ast.parse(job["source"], "<candidate>")
        problem = find_forbidden(tree, policy)
        code = compile(tree, "<candidate>", "exec")
    except SyntaxError as e:
        return send({"setup": "syntax_error", "detail": f"line {e.lineno}: {e.msg}"})
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return send({"setup": "syntax_error", "detail": describe(e)})
    if problem:
        return send({"setup": problem[0], "detail": problem[1]})

    # Import what the source imports now, before the hook: their own dependencies (dataclasses
    # pulls in inspect, say) load freely, and later imports are mostly cache hits.
    for name in sorted(imported_modules(tree)):
        try:
            __import__(name)
        except ImportError:
            pass  # the candidate's own import fails the same way, as a crash
    real_import = builtins.__import__
    set_limits(job["limits"])
    sys.addaudithook(make_audit_hook(refuse, code, policy, sandbox_dir, read_roots))
    for index, args in enumerate(job["args"]):
        send(run_check(index, code, args, job["entry_point"], policy, real_import))
    send({"done": len(job["args"])})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: candidate finalizers have nothing left to say
