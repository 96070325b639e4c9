"""The child side of the code sandbox: run one candidate against a batch of inputs, send back values.

sandbox.py starts this file as `python -I -S -B _sandbox_child.py`, inside fresh namespaces and
as an unprivileged uid where it can. It is self-contained on purpose (stdlib only): nothing of
grpoflow is importable in here, and nothing in here knows the expected answers.

The order of main() is the design:
  1. read the job from stdin: source, inputs, the task's policy, the result fd and its nonce,
     which goes straight to _sandbox_guard.py's private namespace;
  2. check the source statically (syntax, forbidden imports and names);
  3. load what the candidate may use, while loading is still free, then lower the rlimits;
  4. arm the guard: the task's forbidden names leave the interpreter, and from here every
     file, network, process, module-load and introspection event is checked, a refusal
     ending the process on the spot, so candidate code cannot catch it;
  5. for each check: exec the source into fresh globals, call the entry point, send the value.

The parent judges correctness; the child only ever reports values. What this file hands the
candidate (restricted builtins, module views, the static check) is a first filter with clear
messages: attributes fetched by a computed name get around it, and to everything in this
interpreter. What holds then is _sandbox_guard.py; its docstring says how.
"""

import ast
import builtins
import io
import os
import resource
import sys
import types

# json without its C accelerator: _json's encoder sorts keys in C (PyList_Sort), where no
# stand-in for list.sort can see it, and it would stay reachable from candidate code.
sys.modules["_json"] = None
import json  # noqa: E402  (after the line above, on purpose)

# The guard, in the order it is exec'd into one private namespace: the audit hook, then what arms it.
GUARD_FILES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
                    for name in ("_sandbox_hook.py", "_sandbox_guard.py"))
SUPPORTED_PYTHONS = ((3, 11), (3, 13))  # the CPython internals _sandbox_guard.py relies on

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
    for attr, value in list(module.__dict__.items()):  # not vars(): a task may take it away
        if attr.startswith("_") or f"{name}.{attr}" in HIDDEN_MODULE_ATTRIBUTES or (only and attr not in only):
            continue
        if isinstance(value, types.ModuleType):
            allowed = value.__name__.partition(".")[0] in policy["allowed_imports"]
            if not (allowed or sys.modules.get(f"{name}.{attr}") is value):
                continue
            value = module_view(value, policy, memo)
        setattr(view, attr, value)
    return view


def restricted_builtins(policy, real_import, allowed_text):
    views = {}  # one set of module views per check

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            forbid("forbidden_import", f"relative import of {name!r}")
        if type(name) is not str or name.partition(".")[0] not in allowed_imports(policy):
            forbid("forbidden_import", f"import of {name!r}; this task allows {allowed_text}")
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
    table.update({n: v for n, v in builtins.__dict__.items() if isinstance(v, type) and issubclass(v, BaseException)})
    table.update(__build_class__=builtins.__build_class__, __import__=guarded_import, getattr=safe_getattr,
                 hasattr=safe_hasattr, setattr=safe_setattr, delattr=safe_delattr)
    return table


# -- running the checks ------------------------------------------------------------------------

def describe(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:300]
    except BaseException:  # a candidate's exception may fail to print itself
        return type(exc).__name__


def run_check(index, code, args, entry_point, policy, real_import, allowed_text):
    """One check in fresh globals, so nothing a previous check stored can be read back."""
    try:
        namespace = {"__builtins__": restricted_builtins(policy, real_import, allowed_text), "__name__": "candidate"}
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


def run_script(code, policy, real_import, allowed_text, max_chars):
    """The whole source once, as a script (the python tool): what it printed comes back, cut to
    max_chars, and the exception that ended it, if one did."""
    out, real_stdout, real_stderr = io.StringIO(), sys.stdout, sys.stderr
    record = {}
    sys.stdout = sys.stderr = out  # print() looks them up at each call
    try:
        exec(code, {"__builtins__": restricted_builtins(policy, real_import, allowed_text), "__name__": "__main__"})
    except MemoryError:
        record = {"error": "memory", "detail": "MemoryError"}
    except SystemExit as e:  # exit() is an ordinary way for a script to end; a non-zero code is an error
        if e.code not in (None, 0):
            record = {"error": "crashed", "detail": f"SystemExit: {describe(e)}"}
    except BaseException as e:
        record = {"error": "crashed", "detail": describe(e)}
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr
    try:
        text = out.getvalue()
    except MemoryError:
        text = ""
    return {**record, "output": text[:max_chars], "output_chars": len(text)}


def set_limits(limits):
    cpu = limits["cpu_seconds"]
    # soft == hard: where the child is pid 1 of its namespace it ignores SIGXCPU, so the hard
    # limit's SIGKILL is what stops a busy loop; the parent reads the CPU time to call it a timeout.
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, limits["file_bytes"]), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def load_guard():
    """_sandbox_hook.py's and _sandbox_guard.py's functions, with globals of their own: one dict
    nothing else refers to, and a snapshot of the builtins, so that what candidate code rebinds
    never reaches them."""
    if not (sys.implementation.name == "cpython" and SUPPORTED_PYTHONS[0] <= sys.version_info[:2] <= SUPPORTED_PYTHONS[1]):
        raise RuntimeError(f"the code sandbox supports CPython {SUPPORTED_PYTHONS[0]} to {SUPPORTED_PYTHONS[1]}, "
                           f"not {sys.implementation.name} {sys.version_info[:2]}: its guard relies on CPython internals")
    namespace = {"__builtins__": dict(vars(builtins)), "__name__": "grpoflow_sandbox_guard"}
    for path in GUARD_FILES:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), namespace)
    return namespace


def preload(tree, policy):
    """Import, before the guard is armed, what the candidate may use, with their dependencies:
    what it imports, and every stdlib module the task allows, since from then on a module loads
    only if the task allows it by name (a stdlib function that imports a helper lazily would be
    refused). Where the task forbids names, every module it allows, so that take_away() finds
    the forbidden ones in all of them and nothing loads afterwards."""
    names = imported_modules(tree) | (policy["allowed_imports"] & sys.stdlib_module_names)
    if policy["forbidden_builtins"] or policy["forbidden_attributes"]:
        names |= policy["allowed_imports"]
    for name in sorted(names):
        try:
            __import__(name)
        except ImportError:
            pass  # the candidate's own import fails the same way, as a crash


def main():
    job = json.loads(sys.stdin.buffer.read())
    os.close(0)
    guard = load_guard()
    send, refuse = guard["open_channel"](job.pop("nonce"), job["channel_fd"])

    policy = {key: frozenset(job[key]) for key in ("allowed_imports", "forbidden_builtins", "forbidden_attributes")}
    allowed_text = ", ".join(sorted(policy["allowed_imports"]))
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

    preload(tree, policy)
    real_import = builtins.__import__
    set_limits(job["limits"])
    guard["arm"](refuse, policy, code, sandbox_dir, read_roots, SAFE_DUNDERS)
    if job.get("script"):
        send(run_script(code, policy, real_import, allowed_text, job["max_output_chars"]))
        return send({"done": 1})
    for index, args in enumerate(job["args"]):
        send(run_check(index, code, args, job["entry_point"], policy, real_import, allowed_text))
    send({"done": len(job["args"])})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: candidate finalizers have nothing left to say
