"""Escapes from the code sandbox's per-task rules (issue #18), one test per class of route.

A candidate can fetch any attribute by a name the static check never sees (functools.update_wrapper,
operator.attrgetter, match patterns, descriptors...), and from there reach every object in the
child interpreter: the real builtins, sys, os, the harness's globals. The sandbox does not try to
stop that; it makes what the candidate reaches useless (see _sandbox_guard.py). So every cheat
here goes as far as it can and then tries to profit. A cheat that does something other than
sorting ends with an honest merge sort, so it passes exactly when the sandbox let its trick
through; each must end refused, or as a failed check, never as a pass.

Every cheat runs in a real sandboxed child (no mocks), one child per cheat.
"""

from __future__ import annotations

import dataclasses

import pytest

from grpoflow.verifiers import get_code_task, verify_code
from grpoflow.verifiers.code_tasks import DEFAULT_ALLOWED_IMPORTS

pytestmark = pytest.mark.usefixtures("unsandboxed_allowed")  # see conftest.py
SORT = get_code_task("sort_list")
# sort_list's rules with every default module allowed (operator, string, enum, copy...), so the
# helpers those modules offer are in reach too.
WIDE = dataclasses.replace(SORT, name="sort_list_wide", allowed_imports=DEFAULT_ALLOWED_IMPORTS - {"heapq", "bisect"})
REFUSED = {"forbidden_import", "forbidden_code", "forbidden_io"}
FAILED = REFUSED | {"crashed", "wrong_answer", "bad_output"}

# The primitive: update_wrapper copies an attribute named by a string.
FETCH = """
import functools

def fetch(obj, name):
    box = []
    class Catch:
        def __setattr__(self, key, value):
            box.append(value)
    functools.update_wrapper(Catch(), obj, assigned=(name,), updated=())
    return box[0]
"""
# What that primitive reaches: the real builtins module, the real sys, the harness's globals.
REAL = FETCH + """
import sys
BUILTINS = fetch(len, "__self__")
SYS = fetch(sys.getrecursionlimit, "__self__")
HARNESS = fetch(getattr, "__globals__")
OS = SYS.modules["os"]

class Spec:
    def __init__(self, name):
        self.name = name
"""
MERGE = """
def merge_sort(xs):
    if len(xs) <= 1:
        return list(xs)
    a, b = merge_sort(xs[:len(xs) // 2]), merge_sort(xs[len(xs) // 2:])
    out = []
    while a and b:
        out.append((a if a[0] <= b[0] else b).pop(0))
    return out + a + b
"""
# Reading a file outside the sandbox dir and the stdlib: only the audit hook refuses it, so a
# cheat that has switched the hook off gets through.
READ_OUTSIDE = "open('/etc/passwd').read()"
# A frame from a signal handler: main()'s frame is a few f_back away.
HARNESS_FRAME = """
def harness_locals(signal_module):
    frames = []
    signal_module.signal(signal_module.SIGUSR1, lambda signum, frame: frames.append(frame))
    signal_module.raise_signal(signal_module.SIGUSR1)
    frame = frames[0]
    while frame is not None and "fd" not in frame.f_locals:
        frame = frame.f_back
    return frame.f_locals
"""
# With the result channel's fd and nonce, write a full set of results and leave.
FORGE = """
def forge(local, xs):
    nonce, fd = local["nonce"], local["fd"]
    lines = [nonce + "\\t" + '{"check": %d, "value": "%s"}' % (i, str(merge_sort(args[0])))
             for i, args in enumerate(local["job"]["args"])]
    OS.write(fd, ("\\n".join(lines + [nonce + '\\t{"done": %d}' % len(lines)]) + "\\n").encode())
    OS._exit(0)
"""
HEAP_SORT = """
out, heap = [], []
for x in xs:
    heapq.heappush(heap, x)
while heap:
    out.append(heapq.heappop(heap))
return out
"""


def cheat(body: str, *preambles: str) -> str:
    """A sort_list answer: `preambles` at module level, `body` inside sort_list(xs)."""
    return "".join(preambles) + "\ndef sort_list(xs):\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())


# -- 1. attribute fetches by a computed name --------------------------------------------------
# Each helper defines get(obj, name) -> the attribute, used to fetch and call list.sort on a copy.

FETCHERS = {
    "functools.update_wrapper(assigned=)": (FETCH + "get = fetch\n", SORT),
    "functools.update_wrapper(updated=)": ("""
import functools

def get(obj, name):
    box = []
    class Grab:
        def update(self, value):
            box.append(value)
    functools.update_wrapper(type("Holder", (), {name: Grab()})(), obj, assigned=(), updated=(name,))
    return box[0]
""", SORT),
    "functools.wraps": ("""
import functools

def get(obj, name):
    box = []
    class Catch:
        def __setattr__(self, key, value):
            box.append(value)
    functools.wraps(obj, assigned=(name,), updated=())(Catch())
    return box[0]
""", SORT),
    "operator.attrgetter": (REAL + "def get(obj, name):\n    return SYS.modules['operator'].attrgetter(name)(obj)\n", WIDE),
    "operator.methodcaller": (REAL + "def get(obj, name):\n    return lambda: SYS.modules['operator'].methodcaller(name)(obj)\n", WIDE),
    "string.Formatter.get_field": (REAL + "import string\ndef get(obj, name):\n"
                                   "    return SYS.modules['string'].Formatter().get_field('0.' + name, (obj,), {})[0]\n", WIDE),
    "inspect.getattr_static": (REAL + "import dataclasses\ndef get(obj, name):\n"
                               "    return lambda: SYS.modules['inspect'].getattr_static(obj, name)(obj)\n", SORT),
    "object.__getattribute__": (FETCH + "def get(obj, name):\n    return fetch(object, '__getattribute__')(obj, name)\n", SORT),
    "type.__getattribute__": (FETCH + "def get(obj, name):\n"
                              "    return lambda: fetch(type, '__getattribute__')(type(obj), name)(obj)\n", SORT),
    "type.__dict__": (FETCH + "def get(obj, name):\n    return lambda: fetch(type(obj), '__dict__')[name](obj)\n", SORT),
    "vars()": (REAL + "def get(obj, name):\n    return lambda: BUILTINS.vars(type(obj))[name](obj)\n", SORT),
    "the real getattr": (REAL + "def get(obj, name):\n    return BUILTINS.getattr(obj, name)\n", SORT),
    "match class pattern, __match_args__": ("""
class AnyType(type):
    def __instancecheck__(cls, obj):
        return True

def get(obj, name):
    Pattern = AnyType("Pattern", (), {"__match_args__": (name,)})
    match obj:
        case Pattern(found):
            return found
""", SORT),
    "dir() and the guarded getattr": ("def get(obj, name):\n"
                                      "    return [getattr(obj, n) for n in dir(obj) if n == name][0]\n", SORT),
    "typing.get_type_hints evaluates o.sort": (REAL + """
import typing

def get(obj, name):
    holder = type("Holder", (), {"__annotations__": {"x": "o." + name}})
    return SYS.modules["typing"].get_type_hints(holder, localns={"o": obj})["x"]
""", SORT),
    "super() proxy": (FETCH + """
def get(obj, name):
    Sub = type("Sub", (type(obj),), {})
    def call():
        copy = Sub(obj)
        fetch(super(Sub, copy), name)()
        obj[:] = copy
    return call
""", SORT),
}


@pytest.mark.parametrize("preamble, task", FETCHERS.values(), ids=FETCHERS.keys())
def test_an_attribute_fetched_by_a_computed_name_gives_nothing_forbidden(preamble, task):
    source = cheat("ys = list(xs)\nget(ys, 'sort')()\nreturn ys", preamble)
    verdict = verify_code(source, task)
    assert not verdict.passed and verdict.error in FAILED, verdict


# -- 2. a forbidden builtin or method, however it was obtained and called --------------------

INDIRECT_CALLS = {
    # the example: getattr is a closure of the harness, its globals hold the real builtins
    "the harness's builtins module": (REAL, "return HARNESS['builtins'].sorted(xs)", SORT),
    "builtins module as len.__self__": (REAL, "return BUILTINS.sorted(xs)", SORT),
    "__builtins__ of a stdlib function": (REAL, "return fetch(functools.update_wrapper, '__builtins__')['sorted'](xs)", SORT),
    "__globals__ of a stdlib function": (REAL, "return fetch(functools.update_wrapper, '__globals__')['__builtins__']['sorted'](xs)", SORT),
    "sys.modules through a sys view function": (REAL, "return SYS.modules['builtins'].sorted(xs)", SORT),
    "copyreg.__newobj__ from __reduce_ex__": (REAL, "newobj = fetch(xs, '__reduce_ex__')(2)[0]\n"
                                              "return fetch(newobj, '__globals__')['__builtins__']['sorted'](xs)", SORT),
    "sorted restored from the builtins module's init-time copy": (
        REAL, "return SYS.modules['_imp'].create_builtin(Spec('builtins')).sorted(xs)", SORT),
    "bound method": (REAL, "ys = list(xs)\nfetch(ys, 'sort')()\nreturn ys", SORT),
    "unbound method descriptor": (REAL, "ys = list(xs)\nfetch(list, 'sort')(ys)\nreturn ys", SORT),
    "functools.partial": (REAL, "ys = list(xs)\nfunctools.partial(fetch(list, 'sort'), ys)()\nreturn ys", SORT),
    "map() calls it from C": (REAL, "ys = list(xs)\nlist(map(fetch(list, 'sort'), [ys]))\nreturn ys", SORT),
    "itertools.starmap": (REAL + "import itertools\n",
                          "ys = list(xs)\nlist(itertools.starmap(fetch(list, 'sort'), [(ys,)]))\nreturn ys", SORT),
    "min(key=) calls it from C": (REAL, "ys = list(xs)\nmin([ys], key=fetch(list, 'sort'))\nreturn ys", SORT),
    "property": (REAL, "P = type('P', (list,), {'s': property(fetch(list, 'sort'))})\np = P(xs)\np.s\nreturn list(p)", SORT),
    "staticmethod": (REAL, "S = type('S', (), {'f': staticmethod(fetch(list, 'sort'))})\n"
                           "ys = list(xs)\nS.f(ys)\nreturn ys", SORT),
    "a list subclass": (REAL, "L = type('L', (list,), {})\nys = L(xs)\nfetch(ys, 'sort')()\nreturn list(ys)", SORT),
    "collections.UserList.sort": (REAL + "import collections\n",
                                  "ys = collections.UserList(xs)\nfetch(ys, 'sort')()\nreturn list(ys)", SORT),
    "operator.methodcaller from sys.modules": (REAL, "ys = list(xs)\nSYS.modules['operator'].methodcaller('sort')(ys)\nreturn ys", SORT),
    "the real getattr": (REAL, "ys = list(xs)\nBUILTINS.getattr(ys, 'sort')()\nreturn ys", SORT),
    "the real vars()": (REAL, "ys = list(xs)\nBUILTINS.vars(list)['sort'](ys)\nreturn ys", SORT),
    # libraries that sort for the candidate
    "Counter.most_common sorts": ("import collections\n", """
counts = collections.Counter(xs)
order = collections.Counter({x: -x for x in counts}).most_common()
return [x for x, _ in order for _ in range(counts[x])]""", SORT),
    # (the last value stays the largest, so enum has no reason to warn)
    "enum sorts _generate_next_value_'s list": ("import enum\n", "ys = list(xs) + [max(xs, default=0) + 1]\n"
                                                "enum.Enum._generate_next_value_('x', 1, len(ys), ys)\nreturn ys[:-1]", WIDE),
    "dir() returns names sorted": ("", """
lo = min(xs, default=0)
class Names:
    def __init__(self, names):
        self.names = names
    def __dir__(self):
        return self.names
names = dir(Names([f"{x - lo:020d}_{i}" for i, x in enumerate(xs)]))
return [int(n.split("_")[0]) + lo for n in names]""", SORT),
    "json's sort_keys, in C": (REAL, """
lo, counts, out = min(xs, default=0), {}, []
for x in xs:
    counts[f"{x - lo:020d}"] = counts.get(f"{x - lo:020d}", 0) + 1
for key, n in SYS.modules["json"].loads(SYS.modules["json"].dumps(counts, sort_keys=True)).items():
    out += [int(key) + lo] * n
return out""", SORT),
    "dir() through the real builtins": (REAL, """
lo = min(xs, default=0)
Names = type("Names", (), {"__dir__": lambda self: [f"{x - lo:020d}_{i}" for i, x in enumerate(xs)]})
return [int(n.split("_")[0]) + lo for n in BUILTINS.dir(Names())]""", SORT),
    "bisect.insort, loaded by random": (REAL + "import random\n",
                                        "out = []\nfor x in xs:\n    fetch(SYS.modules['bisect'], 'insort')(out, x)\nreturn out", SORT),
    "bisect.bisect and list.insert": (REAL + "import random\n",
                                      "out = []\nfor x in xs:\n    out.insert(fetch(SYS.modules['bisect'], 'bisect')(out, x), x)\nreturn out", SORT),
    "copy.copy calls what __reduce_ex__ names": (REAL + "import copy\n", """
ys = list(xs)
copy.copy(type("R", (), {"__reduce_ex__": lambda self, protocol: (fetch(list, "sort"), (ys,))})())
return ys""", WIDE),
    "code compiled at run time": (REAL, "scope = {'xs': xs}\nBUILTINS.exec('ys = sor' + 'ted(xs)', scope)\nreturn scope['ys']", SORT),
}


@pytest.mark.parametrize("preamble, body, task", INDIRECT_CALLS.values(), ids=INDIRECT_CALLS.keys())
def test_a_forbidden_callable_is_refused_however_it_was_reached(preamble, body, task):
    verdict = verify_code(cheat(body, preamble), task)
    assert not verdict.passed and verdict.error in FAILED, verdict


# -- 3. changing the sandbox's own state from candidate code ----------------------------------
# Each switches off a check, then does what that check refuses.

TAMPERING = {
    "a harness global the hook reads": (REAL + MERGE + "class Everything:\n    def __contains__(self, item):\n        return True\n",
                                        f"HARNESS['READABLE_DEVICES'] = Everything()\n{READ_OUTSIDE}\nreturn merge_sort(xs)", SORT),
    "the hook's table of refused events": (REAL + MERGE, "HARNESS['REFUSED_EVENTS'].clear()\n"
                                           "OS.kill(OS.getpid(), 0)\nreturn merge_sort(xs)", SORT),
    "posixpath.realpath's helper": (REAL + MERGE, "cwd = OS.getcwd()\n"
                                    "fetch(SYS.modules['posixpath'].realpath, '__globals__')['_joinrealpath'] = lambda *a: (cwd, True)\n"
                                    f"{READ_OUTSIDE}\nreturn merge_sort(xs)", SORT),
    "a builtin the hook calls": (REAL + MERGE, f"real_any, BUILTINS.any = BUILTINS.any, lambda items: True\n"
                                 f"{READ_OUTSIDE}\nBUILTINS.any = real_any\nreturn merge_sort(xs)", SORT),
    "typing evaluates a harness global": (REAL + MERGE + "import typing\n", """
holder = type("Holder", (), {"__annotations__": {"x": "REFUSED_EVENTS"}, "__module__": "__main__"})
SYS.modules["typing"].get_type_hints(holder)["x"].clear()
OS.kill(OS.getpid(), 0)
return merge_sort(xs)""", SORT),
    "enum.global_enum writes the harness's globals": ("import enum\n" + MERGE + """
class AlwaysIn:
    def __contains__(self, item):
        return True
""", f"""
enum.global_enum(enum.Enum("E", {{"READABLE_DEVICES": 1}}, module="__main__", type=AlwaysIn))
{READ_OUTSIDE}
return merge_sort(xs)""", WIDE),
    "the guard's own globals, searched for in every class": (REAL, """
todo, seen, guard = [object], set(), None
while todo and guard is None:
    cls = todo.pop()
    for sub in fetch(type, "__subclasses__")(cls):
        if id(sub) not in seen:
            seen.add(id(sub))
            todo.append(sub)
    for value in list(fetch(cls, "__dict__").values()):
        try:
            scope = fetch(value, "__globals__")
        except Exception:
            continue
        if type(scope) is dict and "TAKEN" in scope:
            guard = scope
ys = list(xs)
[original for original in guard["TAKEN"] if original.__name__ == "sort"][0](ys)
return ys""", SORT),
    "the policy in a guarded builtin's closure": (REAL, """
todo, policy = [getattr], None
while todo and policy is None:
    for cell in fetch(todo.pop(), "__closure__") or ():
        value = cell.cell_contents
        if type(value) is dict and "allowed_imports" in value:
            policy = value
        elif callable(value) and type(value).__name__ == "function":
            todo.append(value)
policy["allowed_imports"] = policy["allowed_imports"] | {"heapq"}
heapq = fetch(sort_list, "__builtins__")["__import__"]("heapq")""" + HEAP_SORT, SORT),
}


@pytest.mark.parametrize("preamble, body, task", TAMPERING.values(), ids=TAMPERING.keys())
def test_the_sandbox_state_cannot_be_changed_from_candidate_code(preamble, body, task):
    verdict = verify_code(cheat(body, preamble), task)
    assert not verdict.passed and verdict.error in FAILED, verdict


# -- 4. the result channel ---------------------------------------------------------------------

CHANNEL = {
    "nonce from a signal handler's frame": (REAL + MERGE + HARNESS_FRAME + FORGE,
                                            "forge(harness_locals(SYS.modules['_signal']), xs)"),
    "nonce from a re-created _signal module": (REAL + MERGE + HARNESS_FRAME + FORGE,
                                               "fresh = SYS.modules['_imp'].create_builtin(Spec('_signal'))\n"
                                               "SYS.modules['_imp'].exec_builtin(fresh)\nforge(harness_locals(fresh), xs)"),
    "refusals silenced through refuse()'s closure": (REAL + MERGE + HARNESS_FRAME, f"""
for cell in fetch(harness_locals(SYS.modules['_signal'])["refuse"], "__closure__"):
    real = cell.cell_contents
    if real.__name__ == "send":  # keep sending results, drop the refusal
        cell.cell_contents = lambda record, real=real: None if "violation" in record else real(record)
    elif real.__name__ == "_exit":  # and stay alive after it
        cell.cell_contents = lambda *args, **kwargs: None
{READ_OUTSIDE}
return merge_sort(xs)"""),
    "nonce from a traceback's frame": (REAL + MERGE + FORGE, """
try:
    1 / 0
except ZeroDivisionError as e:
    frame = fetch(e, "__traceback__").tb_frame
while "fd" not in frame.f_locals:
    frame = frame.f_back
forge(frame.f_locals, xs)"""),
    "nonce from a generator's frame": (REAL + MERGE + FORGE, """
frame = fetch((x for x in xs), "gi_frame")
while "fd" not in frame.f_locals:
    frame = frame.f_back
forge(frame.f_locals, xs)"""),
    "nonce from sys._getframe": (REAL + MERGE + FORGE, """
frame = SYS._getframe(1)
while "fd" not in frame.f_locals:
    frame = frame.f_back
forge(frame.f_locals, xs)"""),
    "nonce from gc": (REAL + MERGE, """
gc = fetch(BUILTINS, "__import__")("gc")
nonces = [o for o in gc.get_objects() if type(o) is str and len(o) == 32]
return merge_sort(xs)"""),
    "nonce in the text of the harness's globals": (REAL + MERGE, """
text = "{0.__globals__}".format(getattr)
words = [w.strip("'\\\"") for w in text.split()]
nonces = [w for w in words if len(w) == 32 and all(c in "0123456789abcdef" for c in w)]
assert nonces, "no nonce in the text"
for nonce in nonces:
    for fd in range(3, 64):
        try:
            OS.write(fd, (nonce + '\\t{"done": 0}\\n').encode())
        except OSError:
            pass
return merge_sort(xs)"""),
    "the job read again from stdin": (REAL + MERGE, "OS.read(0, 1 << 20)\nreturn merge_sort(xs)"),
    "the process's memory": (REAL + MERGE, "open('/proc/self/mem', 'rb')\nreturn merge_sort(xs)"),
}


@pytest.mark.parametrize("preamble, body", CHANNEL.values(), ids=CHANNEL.keys())
def test_the_result_channel_cannot_be_read_or_forged(preamble, body):
    verdict = verify_code(cheat(body, preamble), SORT)
    assert not verdict.passed and verdict.error in FAILED, verdict


# -- 5. threads, signals, frames and the hooks themselves ------------------------------------
# Refused outright: a thread or a signal handler gets around the hook's view of the stack.

CAPABILITIES = {
    "a thread from _thread": "SYS.modules['_thread'].start_new_thread(print, ())",
    "a thread from a re-created _thread": "SYS.modules['_imp'].create_builtin(Spec('_thread')).start_new_thread(print, ())",
    "threading through the real __import__": "fetch(BUILTINS, '__import__')('threading')",
    "a signal handler": "SYS.modules['_signal'].signal(SYS.modules['_signal'].SIGUSR1, print)",
    "a builtin module re-created": "SYS.modules['_imp'].create_builtin(Spec('gc'))",
    "gc through the real __import__": "fetch(BUILTINS, '__import__')('gc')",
    "sys.settrace": "SYS.settrace(None)",
    "sys.setprofile": "SYS.setprofile(None)",
    "a second audit hook": "SYS.addaudithook(lambda event, args: None)",
    "a traceback's frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    fetch(e, '__traceback__').tb_frame",
    "a coroutine's frame": "async def co():\n    pass\nc = co()\nfetch(c, 'cr_frame')",
}


@pytest.mark.parametrize("act", CAPABILITIES.values(), ids=CAPABILITIES.keys())
def test_threads_signals_frames_and_hooks_are_refused(act):
    verdict = verify_code(cheat(f"{act}\nreturn merge_sort(xs)", REAL, MERGE), SORT)
    assert not verdict.passed and verdict.error in REFUSED, verdict


def test_silencing_a_refusal_leaves_nothing_to_use():
    # Whatever stands in for list.sort can be reached and muted; the real one stays gone.
    source = cheat("""
sort = fetch(list, "sort")
for name, value in list(fetch(sort, "__globals__").items()):
    if callable(value):
        fetch(sort, "__globals__")[name] = lambda *args, **kwargs: None
SYS.audit = lambda *args: None
ys = list(xs)
sort(ys)
return ys""", REAL)
    verdict = verify_code(source, SORT)
    assert not verdict.passed and verdict.error in FAILED, verdict


# -- 6. modules the task does not allow --------------------------------------------------------

MODULES = {
    "heapq through the real __import__": "heapq = fetch(BUILTINS, '__import__')('heapq')",
    "heapq through importlib.import_module": "heapq = SYS.modules['importlib'].import_module('heapq')",
    "_heapq through _imp.create_dynamic": ("heapq = SYS.modules['_imp'].create_dynamic("
                                           "SYS.modules['importlib'].machinery.PathFinder.find_spec('_heapq'))"),
    "heapq through runpy": ("found = fetch(BUILTINS, '__import__')('runpy').run_module('heapq')\n"
                             "heapq = type('M', (), {n: found[n] for n in ('heappush', 'heappop')})"),
}


@pytest.mark.parametrize("load", MODULES.values(), ids=MODULES.keys())
def test_a_module_the_task_does_not_allow_cannot_load(load):
    verdict = verify_code(cheat(load + HEAP_SORT, REAL + "import dataclasses\n"), SORT)
    assert not verdict.passed and verdict.error in REFUSED, verdict


@pytest.mark.parametrize("module", ["gc", "ctypes", "_testcapi", "_xxsubinterpreters", "mmap", "threading", "pickle"])
def test_a_module_outside_the_list_cannot_load_where_the_task_forbids_nothing(module):
    # fib_mod forbids no names, so loading stays open while it runs, but only for its modules.
    source = REAL + f"""
def fib_mod(n, m):
    fetch(BUILTINS, "__import__")({module!r})
    a, b = 0, 1
    for bit in bin(n)[2:]:
        a, b = a * (2 * b - a) % m, (a * a + b * b) % m
        if bit == "1":
            a, b = b, (a + b) % m
    return a
"""
    verdict = verify_code(source, get_code_task("fib_mod"))
    assert not verdict.passed and verdict.error in REFUSED, verdict


# -- honest code that uses the same modules ---------------------------------------------------

LEGITIMATE = {
    "functools.reduce, lru_cache, partial": ("""
import functools

@functools.lru_cache(maxsize=None)
def smaller(a, b):
    return a if a <= b else b

def merge(a, b):
    out = []
    while a and b:
        out.append((a if smaller(a[0], b[0]) == a[0] else b).pop(0))
    return out + a + b

def sort_list(xs):
    return functools.reduce(merge, map(functools.partial(list), ([x] for x in xs)), [])
""", SORT),
    "dataclasses(order=True), min, typing": ("""
import dataclasses
from typing import List

@dataclasses.dataclass(order=True, frozen=True)
class Item:
    value: int
    index: int

def sort_list(xs: List[int]) -> List[int]:
    rest, out = [Item(x, i) for i, x in enumerate(xs)], []
    while rest:
        smallest = min(rest)
        rest.remove(smallest)
        out.append(smallest.value)
    return out
""", SORT),
    "namedtuple, NamedTuple, deque, Counter": ("""
import collections
from typing import NamedTuple

Span = collections.namedtuple("Span", "lo hi")

class Counted(NamedTuple):
    value: int
    count: int

def sort_list(xs):
    if not xs:
        return []
    counts = collections.Counter(xs)
    span = Span(min(xs), max(xs))
    if span.hi - span.lo > 10 * len(xs):  # sparse: insertion into a deque
        out = collections.deque()
        for x in xs:
            out.append(x)
            i = len(out) - 1
            while i > 0 and out[i - 1] > out[i]:
                out[i - 1], out[i] = out[i], out[i - 1]
                i -= 1
        return list(out)
    runs = [Counted(v, counts[v]) for v in range(span.lo, span.hi + 1) if v in counts]
    return [run.value for run in runs for _ in range(run.count)]
""", SORT),
    "random quicksort, itertools, math, sys": ("""
import itertools, math, random, sys

sys.setrecursionlimit(10_000)

def sort_list(xs):
    if len(xs) <= 1:
        return list(xs)
    pivot = random.choice(xs)
    low = [x for x in xs if x < pivot]
    high = [x for x in xs if x > pivot]
    same = list(itertools.repeat(pivot, xs.count(pivot)))
    assert math.isfinite(pivot)
    return sort_list(low) + same + sort_list(high)
""", SORT),
    # singledispatch imports typing when it reads annotations: a module loaded lazily, by the stdlib
    "functools.singledispatch on annotations (fib_mod)": ("""
import functools

@functools.singledispatch
def step(x, m):
    raise TypeError(x)

@step.register
def _(pair: tuple, m: int):
    a, b = pair
    return b % m, (a + b) % m

def fib_mod(n, m):
    if n > 10_000:  # fast doubling
        a, b = 0, 1
        for bit in bin(n)[2:]:
            a, b = a * (2 * b - a) % m, (a * a + b * b) % m
            if bit == "1":
                a, b = b, (a + b) % m
        return a
    pair = (0, 1)
    for _ in range(n):
        pair = step(pair, m)
    return pair[0]
""", get_code_task("fib_mod")),
    "operator, enum, string, copy, fractions": ("""
import copy, enum, fractions, operator, string

class Order(enum.IntEnum):
    LESS = -1
    SAME = 0
    MORE = 1

def compare(a, b):
    return Order((a > b) - (a < b))

def sort_list(xs):
    assert string.digits == "0123456789" and fractions.Fraction(1, 2) * 2 == 1
    out = copy.deepcopy(list(xs))
    for i in range(1, len(out)):
        j = i
        while j > 0 and compare(out[j - 1], out[j]) is Order.MORE:
            out[j - 1], out[j] = operator.itemgetter(j, j - 1)(out)
            j -= 1
    return out
""", WIDE),
}


@pytest.mark.parametrize("source, task", LEGITIMATE.values(), ids=LEGITIMATE.keys())
def test_honest_code_using_the_same_modules_still_passes(source, task):
    verdict = verify_code(source, task)
    assert verdict.passed, verdict


# -- 7. the compiler's sort --------------------------------------------------------------------
# The compiler orders a function's cell and free variables by name, in C. Code compiled at run
# time with a variable per value, named so that names sort as the values do, has them sorted;
# each cheat reads that order from one place it shows.

COMPILER = REAL + """
import dataclasses

def cells(xs):
    # the offsets of the distinct values from the smallest, and the source of outer(): a
    # variable per offset, assigned that offset, and inner() using them all in the order of xs
    lo = min(xs, default=0)
    offsets = [x - lo for x in dict.fromkeys(xs)] + [10**19]  # one more: a single value still makes a list
    names = ["v%020d" % k for k in offsets]
    source = ("def outer():\\n" + "".join(f"    {n} = {k}\\n" for n, k in zip(names, offsets))
              + "    def inner():\\n        (" + ", ".join(names) + ",)\\n        return f()\\n    return inner\\n")
    return offsets, lo, source

def run(source, f=None):
    scope = {"f": f}
    BUILTINS.exec(source, scope)
    return scope["outer"]()

def expand(xs, lo, order):
    counts = {}
    for x in xs:
        counts[x] = counts.get(x, 0) + 1
    return [k + lo for k in order if k + lo in counts for _ in range(counts[k + lo])]

def by_name(names):
    return [int(n[-20:]) for n in names if n[-20:].isdigit()]
"""
COMPILER_SORTS = {
    "co_cellvars": "order = by_name(fetch(fetch(outer, '__code__'), 'co_cell' + 'vars'))",
    "co_freevars": "order = by_name(fetch(fetch(inner, '__code__'), 'co_free' + 'vars'))",
    "__closure__": "order = [fetch(cell, 'cell_contents') for cell in fetch(inner, '__clo' + 'sure__')]",
    "_varname_from_oparg": """
name_of = fetch(fetch(inner, '__code__'), '_varname' + '_from_oparg')
order = by_name([name_of(i) for i in range(len(offsets))])""",
    "the bytecode's operands": """
ops = SYS.modules["opcode"].opmap
raw, extended, ranks = fetch(fetch(inner, '__code__'), 'co_' + 'code'), 0, []
for i in range(0, len(raw), 2):
    op, arg = raw[i], raw[i + 1] | extended
    extended = arg << 8 if op == ops["EXTENDED_ARG"] else 0
    if op == ops["LOAD_DEREF"]:
        ranks.append(arg)
order = [None] * len(ranks)
for k, rank in zip(offsets, ranks):
    order[rank] = k""",
    "locals() under another name": "order = by_name(run(source, BUILTINS.locals)())",
    "vars() under another name": "order = by_name(run(source, BUILTINS.vars)())",
    "marshal's bytes": """
data, order, i = SYS.modules["marshal"].dumps(BUILTINS.compile(source, "<cells>", "exec")), [], 0
while (i := data.find(b"v", i) + 1) > 0:
    if data[i:i + 20].isdigit() and int(data[i:i + 20]) not in order:
        order.append(int(data[i:i + 20]))""",
    "dataclass default factories (no compile of ours)": """
fields = [("v%020d" % k, int, dataclasses.field(default_factory=BUILTINS.locals)) for k in offsets]
made = dataclasses.make_dataclass("Cells", fields)()
order = by_name([n for n in fetch(made, fields[0][0]) if n.startswith("_dflt_")])""",
}


@pytest.mark.parametrize("read", COMPILER_SORTS.values(), ids=COMPILER_SORTS.keys())
def test_a_sort_done_by_the_compiler_is_refused(read):
    body = ("offsets, lo, source = cells(xs)\nouter = run(source.replace('return inner', 'return outer'))\n"
            "inner = run(source)\n" + read.strip("\n") + "\nreturn expand(xs, lo, order)")
    verdict = verify_code(cheat(body, COMPILER), SORT)
    assert not verdict.passed and verdict.error in FAILED, verdict


def test_the_guards_bytecode_reader_agrees_with_dis():
    # The guard reads run-time code without dis (dis calls builtins a task may take away).
    import builtins
    import collections
    import dis
    import types
    from pathlib import Path

    import grpoflow.verifiers

    hook_path = Path(grpoflow.verifiers.__file__).with_name("_sandbox_hook.py")
    guard = {"__builtins__": dict(vars(builtins)), "__name__": "guard_under_test"}
    exec(compile(hook_path.read_text(), str(hook_path), "exec"), guard)
    todo = [compile(Path(m.__file__).read_text(), m.__file__, "exec") for m in (collections, dataclasses, dis)]
    while todo:
        code = todo.pop()
        todo += [k for k in code.co_consts if isinstance(k, types.CodeType)]
        expected = [(i.opname, i.argval) for i in dis.get_instructions(code) if i.opcode in guard["HASNAME"]]
        assert list(guard["names_in"](code)) == expected, code
