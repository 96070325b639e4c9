"""The code verifier against honest solutions and the reward hacks RL finds.

Every test runs real sandboxed children (no mocks). Each cheat here passes against a naive
verifier (exec in-process, fixed inputs, trusting the child's timings or exit code), so each
test fails if the defence it covers is removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from grpoflow.verifiers import (
    CodeTask, SandboxLimits, code_reward, draw_checks, extract_code, get_code_task, isolation, verify_code,
)
from grpoflow.verifiers import code_tasks

pytestmark = pytest.mark.usefixtures("unsandboxed_allowed")  # see conftest.py
SORT = get_code_task("sort_list")
# The same task, but letting the candidate import capability modules (os, gc, socket...), so
# what stops it is the layer under the import allow-list: the audit hook and the OS.
OPEN = dataclasses.replace(
    SORT, name="sort_list_open", n_checks=3,
    allowed_imports=SORT.allowed_imports | {"os", "gc", "inspect", "time", "socket", "subprocess", "threading"},
    limits=SandboxLimits(cpu_seconds=1, wall_seconds=1.5, memory_mb=256),
)
N_BUSY = 1_500_000
BUSY = CodeTask(
    name="busy_sum", entry_point="busy_sum", prompt="sum(range(n)) with a loop",
    generate=lambda rng: (N_BUSY + rng.randint(0, 10),), reference=lambda n: n * (n - 1) // 2,
    allowed_imports=frozenset({"time"}), n_checks=3,
)

SELECTION_SORT = """
    out, rest = [], list(xs)
    while rest:
        smallest = min(rest)
        rest.remove(smallest)
        out.append(smallest)
    return out
"""
MERGE_SORT = """
def sort_list(xs):
    if len(xs) <= 1:
        return list(xs)
    mid = len(xs) // 2
    a, b = sort_list(xs[:mid]), sort_list(xs[mid:])
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
"""
FIB_MOD = """
def fib_mod(n, m):
    def pair(k):
        if k == 0:
            return 0, 1 % m
        a, b = pair(k // 2)
        c, d = a * (2 * b - a) % m, (a * a + b * b) % m
        return (d, (c + d) % m) if k % 2 else (c, d)
    return pair(n)[0]
"""
COUNT_PRIMES = """
from typing import List
import math

def count_primes(n: int) -> int:
    if n < 3:
        return 0
    is_prime: List[bool] = [True] * n
    is_prime[0] = is_prime[1] = False
    for p in range(2, math.isqrt(n - 1) + 1):
        if is_prime[p]:
            for q in range(p * p, n, p):
                is_prime[q] = False
    return sum(is_prime)
"""


def sorter(preamble: str = "", before: str = "") -> str:
    """A correct selection sort with `preamble` at module level and `before` in the function."""
    body = "".join(f"    {line}\n" for line in before.splitlines())
    return f"{preamble}\ndef sort_list(xs):\n{body}{SELECTION_SORT}"


def refused(verdict, *kinds):
    return not verdict.passed and verdict.error in kinds


# -- honest code --------------------------------------------------------------------------------

@pytest.mark.parametrize("task_name, source", [
    ("sort_list", MERGE_SORT), ("sort_list", sorter()), ("fib_mod", FIB_MOD), ("count_primes", COUNT_PRIMES),
])
def test_correct_solution_passes(task_name, source):
    verdict = verify_code(source, get_code_task(task_name))
    assert verdict.passed, verdict
    assert (verdict.error, verdict.tests_passed, verdict.tests_total) == (None, 8, 8)


def test_everyday_python_is_not_refused():
    # namedtuple/dataclasses/typing compile code and peek at frames internally; sys is a view.
    source = sorter(
        "import sys, collections, dataclasses\nfrom typing import NamedTuple\nsys.setrecursionlimit(5000)\n"
        "Pair = collections.namedtuple('Pair', 'a b')\n"
        "@dataclasses.dataclass(order=True, frozen=True)\nclass Box:\n    v: int\n"
        "class Tagged(NamedTuple):\n    v: int\n"
        "class Acc:\n    def __init__(self):\n        self._items = []\n    def __len__(self):\n        return len(self._items)\n",
        before="assert Box(1) < Box(2) and Pair(1, 2).b == 2 and Tagged(3).v == 3 and len(Acc()) == 0\n"
               "open('scratch.txt', 'w').write('scratch space is the sandbox dir')\n"
               "print('debug output goes nowhere')")
    verdict = verify_code(source, SORT)
    assert verdict.passed, verdict


def test_wrong_solution_fails_with_wrong_answer():
    # Drops the smallest element: wrong on every non-empty list, so this cannot pass by luck.
    verdict = verify_code(sorter().replace("return out", "return out[1:]"), SORT)
    assert refused(verdict, "wrong_answer")
    assert "expected" in verdict.detail and verdict.tests_passed < verdict.tests_total


def test_results_are_compared_with_their_types():
    floats = sorter().replace("return out", "return [float(x) for x in out]")
    assert refused(verify_code(floats, SORT), "wrong_answer")
    always_equal = "class Yes(list):\n    def __eq__(self, other):\n        return True\n" \
                   "def sort_list(xs):\n    return Yes(['PASSED'])"
    assert refused(verify_code(always_equal, SORT), "wrong_answer")
    opaque = "class Yes:\n    def __eq__(self, other):\n        return True\ndef sort_list(xs):\n    return Yes()"
    assert refused(verify_code(opaque, SORT), "bad_output")


def test_syntax_error_and_missing_entry_point():
    assert refused(verify_code("def sort_list(xs)\n    return xs", SORT), "syntax_error")
    assert refused(verify_code("def other(xs):\n    return xs", SORT), "crashed")


def test_a_task_may_allow_what_another_refuses():
    numpy_sort = "import numpy as np\ndef sort_list(xs):\n    return [int(v) for v in np.sort(np.array(xs, dtype=np.int64))]"
    allows_numpy = dataclasses.replace(SORT, allowed_imports=frozenset({"numpy"}), forbidden_attributes=frozenset())
    assert verify_code(numpy_sort, allows_numpy).passed
    assert refused(verify_code(numpy_sort, SORT), "forbidden_import")


# -- cheat 1: patching the timer ----------------------------------------------------------------

def test_patched_timers_do_not_change_measured_time():
    source = """
import time
for name in ("perf_counter", "time", "process_time", "monotonic"):
    setattr(time, name, lambda: 0.0)

def busy_sum(n):
    total = 0
    for i in range(n):
        total += i
    return total
"""

    def busy_sum(n):  # the same loop, timed here as the real cost
        total = 0
        for i in range(n):
            total += i
        return total

    start = time.process_time()
    for _ in range(BUSY.n_checks):
        busy_sum(N_BUSY)
    real_cost = time.process_time() - start

    verdict = verify_code(source, BUSY)
    assert verdict.passed, verdict
    assert verdict.cpu_seconds >= 0.5 * real_cost, (verdict.cpu_seconds, real_cost)
    assert verdict.wall_seconds >= verdict.cpu_seconds * 0.5


# -- cheat 2: state between checks, memorised answers -------------------------------------------

def test_module_state_does_not_survive_between_checks():
    # Deliberately wrong ([]) as soon as it sees a mark left by an earlier check.
    source = sorter(
        "import math, functools\nCALLS = []",
        before="CALLS.append(1)\n"
               "if len(CALLS) > 1 or getattr(math, 'seen', False) or getattr(functools, 'seen', False):\n"
               "    return []\n"
               "math.seen = functools.seen = True")
    verdict = verify_code(source, SORT)
    assert verdict.passed, verdict


def test_answers_memorised_from_one_run_fail_on_fresh_inputs():
    seed = 20240613
    table = {repr(check.args[0]): check.expected for check in draw_checks(SORT, seed)}
    lookup = f"ANSWERS = {table!r}\ndef sort_list(xs):\n    return ANSWERS.get(repr(xs), [])"
    assert verify_code(lookup, SORT, seed=seed).passed  # the cheat works on the inputs it saw
    assert refused(verify_code(lookup, SORT), "wrong_answer")  # and fails on a fresh draw


def test_every_run_draws_fresh_inputs():
    a, b = verify_code(MERGE_SORT, SORT), verify_code(MERGE_SORT, SORT)
    assert a.seed != b.seed
    assert [c.args for c in draw_checks(SORT, a.seed)] != [c.args for c in draw_checks(SORT, b.seed)]


# -- cheat 3: the library instead of the algorithm ----------------------------------------------

@pytest.mark.parametrize("source, kind", [
    ("import numpy\ndef sort_list(xs):\n    return numpy.sort(xs).tolist()", "forbidden_import"),
    ("from numpy import sort\ndef sort_list(xs):\n    return sort(xs).tolist()", "forbidden_import"),
    ("import heapq\ndef sort_list(xs):\n    return heapq.nsmallest(len(xs), xs)", "forbidden_import"),
    ("import importlib\ndef sort_list(xs):\n    return importlib.import_module('numpy').sort(xs).tolist()", "forbidden_import"),
    ("def sort_list(xs):\n    return __import__('heapq').nsmallest(len(xs), xs)", "forbidden_code"),
    ("def sort_list(xs):\n    return sorted(xs)", "forbidden_import"),
    ("def sort_list(xs):\n    return __builtins__['sorted'](xs)", "forbidden_code"),
    ("def sort_list(xs):\n    ys = list(xs)\n    ys.sort()\n    return ys", "forbidden_import"),
    ("def sort_list(xs):\n    ys = list(xs)\n    getattr(ys, 'so' + 'rt')()\n    return ys", "forbidden_import"),
    ("def sort_list(xs):\n    return print.__self__.sorted(xs)", "forbidden_code"),
    ("def sort_list(xs):\n    return getattr(print, '__se' + 'lf__').sorted(xs)", "forbidden_code"),
    ("def sort_list(xs):\n    return [c for c in ().__class__.__base__.__subclasses__()][0](xs)", "forbidden_code"),
    ("def sort_list(xs):\n    match print:\n        case object(__self__=b):\n            return b.sorted(xs)", "forbidden_code"),
    # typing evaluates annotation strings, in the globals of whatever module a class names
    ("import typing\nX = type('X', (), {'__module__': 'collections', '__annotations__': {'s': '_sys'}})\n"
     "def sort_list(xs):\n    return typing.get_type_hints(X)['s'].modules['builtins'].sorted(xs)", "crashed"),
    # ...and singledispatch calls it internally, here in the harness's globals (via __wrapped__):
    # the string is refused as it compiles, before typing even looks at the value
    ("import functools\nW = type('W', (), {'__wrapped__': getattr, '__annotations__': {'x': 'builtins'}})\n"
     "@functools.singledispatch\ndef f(x):\n    pass\n"
     "def sort_list(xs):\n    f.register(W())\n    return list(f.registry)[-1].sorted(xs)", "forbidden_code"),
    ("import sys\ndef sort_list(xs):\n    return sys.modules['builtins'].sorted(xs)", "crashed"),  # sys is a view
])
def test_forbidden_shortcuts_are_refused(source, kind):
    verdict = verify_code(source, SORT)
    assert refused(verdict, kind), verdict


# -- cheat 4: reading the expected output -------------------------------------------------------

@pytest.mark.parametrize("before, kind", [
    (f"open({code_tasks.__file__!r}).read()", "forbidden_io"),  # the references' source
    ("open('/proc/%d/environ' % os.getppid()).read()", "forbidden_io"),
    ("open('/proc/1/cmdline').read()", "forbidden_io"),
    ("os.listdir('..')", "forbidden_io"),  # the verifier's temp dir
    ("try:\n    gc.get_objects()\nexcept Exception:\n    pass", "forbidden_code"),  # swallowing does not help
    ("def gen():\n    yield\ng = gen()\ng.gi_frame.f_back", "forbidden_code"),
])
def test_reading_the_verifiers_state_is_refused(before, kind):
    verdict = verify_code(sorter("import os, gc", before=before), OPEN)
    assert refused(verdict, kind), verdict


def test_no_stack_frame_reaches_the_candidate():
    # Wrong on purpose if any frame (the way up to the harness) comes back.
    source = sorter("import inspect", before="try:\n    frame = inspect.currentframe()\n"
                                             "except ValueError:\n    frame = None\n"
                                             "if frame is not None:\n    return []")
    verdict = verify_code(source, OPEN)
    assert verdict.passed, verdict


# -- cheat 5: leaving early with "success" ------------------------------------------------------

@pytest.mark.parametrize("source", [
    sorter("import sys", before="sys.exit(0)"),
    "raise SystemExit(0)\n" + sorter(),
    sorter("import os", before="os._exit(0)"),
    sorter("import os", before="os.abort()"),
    "print('ALL TESTS PASSED')\ndef sort_list(xs):\n    print('PASSED')",
    sorter("import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n        pass"),
    # a forged "done" line on every fd the result channel could be
    sorter("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32 + b'\\t{\"done\": 3}\\n')\n"
           "    except OSError:\n        pass"),
])
def test_exiting_early_or_faking_success_fails(source):
    verdict = verify_code(source, OPEN)
    assert not verdict.passed, verdict
    assert verdict.error in {"crashed", "wrong_answer", "bad_output"}, verdict


# -- limits and side effects --------------------------------------------------------------------

def test_infinite_loop_times_out_within_the_wall_limit():
    verdict = verify_code(sorter(before="while True:\n    pass"), OPEN)
    assert refused(verdict, "timeout")
    assert verdict.wall_seconds <= OPEN.limits.wall_seconds + 1.0


def test_sleeping_times_out_on_the_wall_clock():
    verdict = verify_code(sorter("import time", before="time.sleep(60)"), OPEN)
    assert refused(verdict, "timeout")
    assert verdict.wall_seconds <= OPEN.limits.wall_seconds + 1.0 and verdict.cpu_seconds < 0.5


def test_memory_bomb_hits_the_memory_limit():
    verdict = verify_code(sorter(before="hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))"), OPEN)
    assert refused(verdict, "memory")


def test_writing_outside_the_sandbox_dir_is_refused(tmp_path):
    target = Path("/tmp") / f"grpoflow-escape-{os.getpid()}"
    for before in (f"open({str(target)!r}, 'w').write('x')",
                   f"open('moved', 'w').close()\nos.rename('moved', {str(target)!r})",
                   f"os.remove({str(tmp_path / 'keep')!r})"):
        (tmp_path / "keep").write_text("keep")
        verdict = verify_code(sorter("import os", before=before), OPEN)
        assert refused(verdict, "forbidden_io"), (before, verdict)
        assert not target.exists() and (tmp_path / "keep").exists()


@pytest.mark.parametrize("before", [
    "import socket\ns = socket.socket()\ns.connect(('10.0.0.1', 80))",
    "import socket\nsocket.create_connection(('localhost', 22))",
])
def test_network_is_refused(before):
    assert refused(verify_code(sorter(before=before), OPEN), "forbidden_io")


def test_socket_import_is_refused_where_the_task_does_not_allow_it():
    assert refused(verify_code(sorter("import socket"), SORT), "forbidden_import")


@pytest.mark.parametrize("before, kinds", [
    ("import os\nwhile True:\n    os.fork()", {"forbidden_io"}),
    ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", {"forbidden_io"}),
    ("import os\nos.system('true')", {"forbidden_io"}),
    # refused by the guard, which takes thread creation away; RLIMIT_NPROC=0 backs it up
    ("import threading\nthreading.Thread(target=print).start()", {"forbidden_io"}),
])
def test_processes_and_threads_are_refused(before, kinds):
    verdict = verify_code(sorter(before=before), OPEN)
    assert not verdict.passed and verdict.error in kinds, verdict


def test_isolation_is_reported():
    mechanisms = isolation()
    assert mechanisms[0].startswith("isolation: ") and any("audit hook" in m for m in mechanisms)
    if os.geteuid() == 0:  # as root, bubblewrap or util-linux: namespaces are in force (test_code_sandbox.py)
        assert any(m.startswith("namespaces:") for m in mechanisms), mechanisms


# -- completions and the reward -----------------------------------------------------------------

def test_extract_code_takes_the_last_block_defining_the_entry_point():
    completion = ("First try:\n```python\ndef sort_list(xs):\n    return xs\n```\n"
                  "Fixed:\n```python\ndef sort_list(xs):\n    return 'fixed'\n```\n"
                  "Usage:\n```python\nprint(sort_list([2, 1]))\n```\n")
    assert "fixed" in extract_code(completion, "sort_list")
    assert extract_code("no code at all", "sort_list") is None
    assert extract_code("```python\ndef helper(xs):\n    pass\n```", "sort_list") is None


def test_code_reward_scores_each_row_by_its_task():
    fenced = "Here you go:\n```python\n{}\n```".format
    completions = [fenced(MERGE_SORT), fenced("def sort_list(xs):\n    return sorted(xs)"), "I don't know.",
                   [{"role": "assistant", "content": fenced(FIB_MOD)}], "not a code row"]
    tasks = ["sort_list", "sort_list", "sort_list", "fib_mod", None]
    assert code_reward(prompts=[""] * 5, completions=completions, task=tasks) == [1.0, 0.0, 0.0, 1.0, None]


def test_code_reward_without_a_task_column_says_what_to_do():
    with pytest.raises(ValueError, match="column `task`"):
        code_reward(prompts=[""], completions=["x"], answer=["1"])
    with pytest.raises(KeyError, match="registered"):
        code_reward(prompts=[""], completions=["```python\ndef f(): pass\n```"], task=["no_such_task"])


def test_forbidden_names_must_be_plain_names():
    # The sandbox takes forbidden names out of the interpreter; C calls special methods directly.
    with pytest.raises(ValueError, match="special methods"):
        dataclasses.replace(SORT, forbidden_attributes=frozenset({"__lt__"}))


def test_generators_must_survive_json():
    bad = dataclasses.replace(SORT, generate=lambda rng: ((1, 2),))
    with pytest.raises(ValueError, match="survive JSON"):
        draw_checks(bad, seed=0)
    assert json.loads(json.dumps([c.args for c in draw_checks(SORT, seed=0)]))
