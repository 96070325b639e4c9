"""Coding tasks for the code verifier: what a task is, and the catalogue of them by name.

A task is an entry point, an input generator and a trusted reference. The verifier draws fresh
inputs from the generator on every run and computes the expected outputs with the reference
in its own process; the candidate never sees either, only the inputs of each check.

Inputs and outputs travel as JSON, so a generator returns a tuple of JSON values (ints, floats,
strs, bools, None, lists, dicts with str keys); no tuples or sets inside it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpoflow.verifiers.sandbox import SandboxLimits

# Modules any task may import unless it narrows the list: pure computation, no I/O. The child
# hands out views of them that hide private names and modules the task does not allow, and
# `sys` comes with only setrecursionlimit & co.
DEFAULT_ALLOWED_IMPORTS = frozenset({
    "math", "cmath", "itertools", "functools", "collections", "heapq", "bisect", "typing", "operator",
    "random", "sys", "string", "re", "dataclasses", "enum", "fractions", "decimal", "copy",
})


# Dunder attributes that are data, not special methods: the interpreter never looks them up to
# run an operation, so they can be taken away like any other name.
DATA_DUNDERS = frozenset({"__closure__"})


@dataclass(frozen=True)
class CodeTask:
    name: str
    entry_point: str  # the function the candidate must define, called once per check
    prompt: str  # what the model is asked; dataset builders put it in the prompt column
    generate: Callable[[random.Random], tuple]  # rng -> the arguments of one check
    reference: Callable[..., Any]  # trusted solution, run in the verifier's process only
    allowed_imports: frozenset[str] = DEFAULT_ALLOWED_IMPORTS  # top-level module names
    # Forbidden names leave the whole interpreter while the candidate runs (see
    # _sandbox_guard.py): the libraries it calls lose them too, so forbid what the task is
    # about (sort), not what every library uses (join). Attributes are method or function
    # names, looked up on every loaded class and module.
    forbidden_builtins: frozenset[str] = frozenset()  # e.g. {"sorted"} for a sorting task
    forbidden_attributes: frozenset[str] = frozenset()  # e.g. {"sort"}: no xs.sort(), list.sort
    n_checks: int = 8
    limits: SandboxLimits = SandboxLimits()

    def __post_init__(self):
        if not self.entry_point.isidentifier():
            raise ValueError(f"CodeTask {self.name!r}: entry_point {self.entry_point!r} is not a Python identifier")
        if self.n_checks < 1:
            raise ValueError(f"CodeTask {self.name!r}: n_checks must be >= 1, got {self.n_checks}")
        for field_name in ("allowed_imports", "forbidden_builtins", "forbidden_attributes"):
            if isinstance(getattr(self, field_name), str):
                raise ValueError(f"CodeTask {self.name!r}: {field_name} must be a set of names, got a str")
        for field_name in ("forbidden_builtins", "forbidden_attributes"):
            bad = sorted(n for n in getattr(self, field_name)
                         if not n.isidentifier() or (n.startswith("__") and n not in DATA_DUNDERS))
            if bad:
                raise ValueError(f"CodeTask {self.name!r}: {field_name} {bad} are not plain names. Forbid methods "
                                 "and functions by name (\"sort\"); special methods (__lt__) cannot be taken away, "
                                 "since the interpreter calls them from C")


CODE_TASKS: dict[str, CodeTask] = {}


def register_code_task(task: CodeTask) -> CodeTask:
    if task.name in CODE_TASKS:
        raise ValueError(f"code task {task.name!r} is already registered; pick another name")
    CODE_TASKS[task.name] = task
    return task


def get_code_task(name: str) -> CodeTask:
    try:
        return CODE_TASKS[name]
    except KeyError:
        raise KeyError(f"no code task named {name!r}; registered: {sorted(CODE_TASKS)}. Register "
                       "yours with grpoflow.verifiers.code_tasks.register_code_task") from None


# -- sort_list: the algorithm, not the library ----------------------------------------------------

def _int_list(rng: random.Random) -> tuple:
    n = rng.choice([0, 1, 2, rng.randint(3, 20), rng.randint(20, 300)])
    spread = rng.choice([3, 1000, 10**9])  # small spreads make many duplicates
    return ([rng.randint(-spread, spread) for _ in range(n)],)


# Where the interpreter sorts in C and a candidate can see the order, for a task that forbids
# sorting. dir() lists names sorted. The compiler orders a function's cell and free variables by
# name, so run-time code with a variable named after each value has them sorted; the order shows
# in __closure__, in the code object (co_cellvars, co_freevars, the bytecode's operands,
# _varname_from_oparg) and in locals() / vars() called inside that function (a dataclass's
# default_factory is called there too). marshal's bytes of a code object show it as well: the
# guard refuses marshal in every task that forbids names. json's C encoder sorts keys: the
# child loads json without it.
INTERPRETER_SORTS = {
    "builtins": frozenset({"dir", "locals", "vars"}),
    "attributes": frozenset({"__closure__", "co_cellvars", "co_freevars", "co_code", "_co_code_adaptive",
                             "_varname_from_oparg"}),
}


register_code_task(CodeTask(
    name="sort_list",
    entry_point="sort_list",
    prompt="Write a Python function `sort_list(xs)` that returns a new list with the integers of "
           "`xs` in ascending order. Do not use `sorted`, `list.sort` or any sorting library.",
    generate=_int_list,
    reference=lambda xs: sorted(xs),
    # No heapq/bisect: heapq.nsmallest or bisect.insort would do the sorting for it. random
    # loads bisect, where candidate code can reach it, so its functions are forbidden by name
    # (random.choices with weights uses one, and refuses here). The interpreter also sorts in C,
    # where no stand-in for list.sort sees it, so what shows those orders goes too (INTERPRETER_SORTS).
    allowed_imports=frozenset({"math", "itertools", "functools", "collections", "typing", "random", "sys", "dataclasses"}),
    forbidden_builtins=frozenset({"sorted"}) | INTERPRETER_SORTS["builtins"],
    forbidden_attributes=frozenset({"sort", "insort", "insort_left", "insort_right", "bisect", "bisect_left",
                                    "bisect_right"}) | INTERPRETER_SORTS["attributes"],
))


# -- fib_mod: needs O(log n), not a loop to n ----------------------------------------------------

def _fib_pair(n: int, m: int) -> tuple[int, int]:
    """(F(n), F(n+1)) mod m by fast doubling."""
    if n == 0:
        return 0, 1 % m
    a, b = _fib_pair(n // 2, m)
    c = a * ((2 * b - a) % m) % m
    d = (a * a + b * b) % m
    return (d, (c + d) % m) if n % 2 else (c, d)


register_code_task(CodeTask(
    name="fib_mod",
    entry_point="fib_mod",
    prompt="Write a Python function `fib_mod(n, m)` that returns F(n) mod m, where F(0) = 0, "
           "F(1) = 1 and F(k) = F(k-1) + F(k-2). n can be as large as 10**18; 2 <= m <= 10**9.",
    generate=lambda rng: (rng.choice([rng.randint(0, 30), rng.randint(0, 10**18)]), rng.randint(2, 10**9)),
    reference=lambda n, m: _fib_pair(n, m)[0],
))


# -- count_primes: a sieve, and no sympy ---------------------------------------------------------

def _count_primes(n: int) -> int:
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = bytes(len(range(p * p, n, p)))
    return sum(sieve)


register_code_task(CodeTask(
    name="count_primes",
    entry_point="count_primes",
    prompt="Write a Python function `count_primes(n)` that returns how many primes are strictly "
           "less than n, for 0 <= n <= 200000.",
    generate=lambda rng: (rng.choice([rng.randint(0, 30), rng.randint(0, 200_000)]),),
    reference=_count_primes,
))
