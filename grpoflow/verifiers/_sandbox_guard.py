"""What holds while candidate code runs: the task's rules, the audit hook, the result channel.

_sandbox_child.py execs _sandbox_hook.py (the audit hook) and then this file into one dict of
their own (neither is imported, so neither is in sys.modules) and calls open_channel() when it
starts and arm() just before the candidate's first check. Nothing in here may rely on what the
candidate can name. Attributes can be fetched by a string the static check never sees
(functools.update_wrapper, operator.attrgetter, match patterns, str.format fields,
descriptors...), and Python 3.11 audits only a few reads (frames, __code__), so from its first
line a candidate can reach any object in this interpreter: the real builtins, sys, os, every
loaded module, the harness's globals. The policy holds anyway:

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
without an "import" audit event; bytecode reads as _sandbox_hook.py's names_in() reads it.
take_away() checks its work, and the child refuses to run on any other interpreter.
"""

from gc import get_objects, get_referents, get_referrers
from os import _exit, write
from sys import addaudithook, audit

EXIT_REFUSED = 3
ABSTRACT = type.__dict__["__abstractmethods__"]
TYPE_DICT = type.__dict__["__dict__"]  # a class's own namespace, whatever its metaclass says
# JSON string escapes: quotes, backslashes, control characters, and lone surrogates (which
# UTF-8 cannot carry).
JSON_ESCAPES = {c: f"\\u{c:04x}" for c in [*range(0x20), *range(0xD800, 0xE000)]} | {ord('"'): '\\"', ord("\\"): "\\\\"}
STAND_IN = "def refused(*args, **kwargs):\n    audit('grpoflow.forbidden', kind, detail)\n"
TAKEN = []  # the originals take_away() replaced: alive (a cached lookup may still point at one), out of reach


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


def arm(refuse, policy, candidate_code, sandbox_dir, read_roots, safe_dunders):
    """Take the task's forbidden names out of the interpreter and start refusing; from here on
    only the audit hook (make_hook, from _sandbox_hook.py in these same globals), the stand-ins and
    the two files' closures stand between candidate code and everything else."""
    import sys

    loaded = frozenset(sys.modules)
    take_away(policy)
    if "gc" not in policy["allowed_imports"]:
        sys.modules.pop("gc", None)  # imported here; `import gc` must find nothing to hand out
    addaudithook(make_hook(refuse, policy, candidate_code, sandbox_dir, read_roots, loaded, safe_dunders))
