"""Verifying model-written code: run it sandboxed on fresh inputs, judge it here, time it from outside.

    verdict = verify_code(source, get_code_task("sort_list"))
    verdict.passed, verdict.error, verdict.cpu_seconds

How the usual reward hacks are met:
- hard-coded or cached answers: inputs come from a fresh `secrets` seed on every run, and each
  check re-executes the source into fresh globals, so module state from one check is gone by
  the next;
- reading the answers: they are computed here, by the task's reference, and never leave this
  process; the child has no /proc view of it, no gc or frames, no reads outside its dir;
- faking success (exit(0), os._exit, printing PASSED, a forged result line): success means this
  process received, over its own fd, a nonce-tagged value for every check that equals the
  expected one. Anything else is a failure;
- banned shortcuts (numpy, `sorted`, `list.sort`): refused statically and at import/attribute
  time in the child (see _sandbox_child.py), and taken out of the child's interpreter while
  the candidate runs, so no route to them works: not an attribute fetched by a computed name,
  not a C function or a library calling them (see _sandbox_guard.py);
- a patched timer: cpu_seconds and wall_seconds are measured by this process (os.wait4).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from grpoflow.verifiers.code_tasks import CODE_TASKS, CodeTask, get_code_task
from grpoflow.verifiers.sandbox import SandboxRun, run_in_sandbox

ErrorKind = Literal[
    "timeout",  # CPU or wall-clock limit
    "memory",  # MemoryError under the address-space limit
    "forbidden_import",  # a module, builtin or method the task does not allow
    "forbidden_code",  # reflection that escapes the restricted namespace: dunders, frames, gc
    "forbidden_io",  # files outside the sandbox dir, network, processes, threads, signals
    "crashed",  # an exception, a missing entry point, or the process dying early
    "wrong_answer",
    "bad_output",  # a result that is not JSON, or lines on the result channel it did not write
    "syntax_error",
]
ERROR_KINDS = frozenset(ErrorKind.__args__)
MAX_SOURCE_CHARS = 100_000


@dataclass(frozen=True)
class Verdict:
    passed: bool
    tests_passed: int
    tests_total: int
    error: ErrorKind | None  # None exactly when passed
    detail: str  # one line for logs: which check, what was expected, what came back
    cpu_seconds: float  # the child's user+sys time, start-up included, measured by the parent
    wall_seconds: float  # from spawn to reap, measured by the parent
    seed: int  # reproduces the inputs: verify_code(..., seed=verdict.seed)


@dataclass(frozen=True)
class Check:
    args: list  # as the candidate receives them (JSON-decoded)
    expected: Any  # the reference's answer, JSON-normalised


def draw_checks(task: CodeTask, seed: int) -> list[Check]:
    """The inputs and expected outputs of one run; the reference runs here, on a copy."""
    rng = random.Random(seed)
    checks = []
    for _ in range(task.n_checks):
        raw = task.generate(rng)
        args = json.loads(json.dumps(list(raw)))
        if args != list(raw):
            raise ValueError(f"code task {task.name!r}: its generator returned {raw!r:.200}, which does not "
                             "survive JSON unchanged (tuples, sets, non-str dict keys?); return lists and dicts")
        expected = json.loads(json.dumps(task.reference(*copy.deepcopy(args))))
        checks.append(Check(args=args, expected=expected))
    return checks


def verify_code(source: str, task: CodeTask, *, seed: int | None = None) -> Verdict:
    """Run `source` against `task` on fresh inputs (or the inputs of `seed`) and judge it."""
    seed = secrets.randbits(63) if seed is None else seed
    if len(source) > MAX_SOURCE_CHARS:
        return Verdict(False, 0, task.n_checks, "syntax_error", f"source is {len(source)} chars; "
                       f"the limit is {MAX_SOURCE_CHARS}", 0.0, 0.0, seed)
    checks = draw_checks(task, seed)
    run = run_in_sandbox({
        "source": source, "entry_point": task.entry_point, "args": [c.args for c in checks],
        "allowed_imports": sorted(task.allowed_imports), "forbidden_builtins": sorted(task.forbidden_builtins),
        "forbidden_attributes": sorted(task.forbidden_attributes),
    }, task.limits)
    return judge(run, checks, task, seed)


def judge(run: SandboxRun, checks: list[Check], task: CodeTask, seed: int) -> Verdict:
    """Turn what the child sent into a verdict. Only values compared here can make it pass."""
    total = len(checks)

    def verdict(error, detail, passed=0):
        return Verdict(error is None, passed, total, error, detail[:400], run.cpu_seconds, run.wall_seconds, seed)

    for record in run.records:  # a refusal or a setup failure decides the verdict on its own
        kind = record.get("violation") or record.get("setup")
        if kind:
            return verdict(kind if kind in ERROR_KINDS else "bad_output", str(record.get("detail", "")))
    if run.forged_lines:
        return verdict("bad_output", f"{run.forged_lines} line(s) on the result channel lack this run's "
                                     "nonce: the candidate wrote to it")

    values, errors, done = {}, [], False
    for record in run.records:
        if "done" in record:
            done = True
        elif "value" in record and record.get("check") in range(total) and record["check"] not in values:
            try:
                values[record["check"]] = json.loads(record["value"])
            except (TypeError, ValueError, RecursionError):
                errors.append(("bad_output", f"check {record['check']}: result does not parse as JSON"))
        elif record.get("error") in ERROR_KINDS:
            errors.append((record["error"], f"check {record.get('check')}: {record.get('detail', '')}"))
        else:
            return verdict("bad_output", f"unexpected record from the sandbox: {record!r:.200}")
    passed = [i for i, c in enumerate(checks) if i in values and _same(c.expected, values[i])]

    if not done:
        if run.killed_for == "wall":
            return verdict("timeout", f"wall-clock limit of {task.limits.wall_seconds}s", len(passed))
        if run.killed_for == "output":
            return verdict("bad_output", f"more than {task.limits.output_mb} MB of results", len(passed))
        if run.cpu_seconds >= task.limits.cpu_seconds - 0.05:
            return verdict("timeout", f"CPU limit of {task.limits.cpu_seconds}s", len(passed))
        if errors:
            return verdict(errors[0][0], errors[0][1], len(passed))
        return verdict("crashed", f"the sandbox exited (code {run.exit_code}) after {len(values)} of {total} "
                                  f"results{_stderr_hint(run)}", len(passed))
    if errors:
        return verdict(errors[0][0], errors[0][1], len(passed))
    if len(values) != total:
        return verdict("bad_output", f"{len(values)} results for {total} checks")
    if len(passed) < total:
        i = next(i for i in range(total) if i not in passed)
        return verdict("wrong_answer", f"check {i}: args {checks[i].args!r:.120} expected "
                                       f"{checks[i].expected!r:.100}, got {values[i]!r:.100}", len(passed))
    return verdict(None, f"{total}/{total} checks passed", total)


def _same(expected: Any, got: Any) -> bool:
    """Equality that also matches types, so True is not 1 and 2.0 is not 2."""
    if type(expected) is not type(got):
        return False
    if isinstance(expected, list):
        return len(expected) == len(got) and all(_same(a, b) for a, b in zip(expected, got))
    if isinstance(expected, dict):
        return expected.keys() == got.keys() and all(_same(expected[k], got[k]) for k in expected)
    return expected == got


def _stderr_hint(run: SandboxRun) -> str:
    last = run.stderr_tail.strip().splitlines()[-1:] if run.stderr_tail.strip() else []
    return f"; stderr: {last[0][:150]}" if last else ""


# -- completions -> code -> reward ----------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python3|python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str, entry_point: str) -> str | None:
    """The last ```python block that defines `entry_point` at top level; None if there is none.

    The last one, because models draft and then correct themselves.
    """
    defines = re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.MULTILINE)
    blocks = [block for block in _FENCE.findall(completion) if defines.search(block)]
    return blocks[-1] if blocks else None


def _completion_text(completion) -> str:
    """TRL passes plain strings, or for conversational data a list of {"role", "content"} messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"code_reward: a completion must be a str or a list of chat messages, got {type(completion).__name__}")


def code_reward(prompts: list, completions: list, **columns) -> list[float | None]:
    """TRL-style reward: 1.0 when a completion's code passes every check of its row's task, else 0.0.

    Reads the dataset column `task`: per row, the name of a registered code task (see
    code_tasks.CODE_TASKS, e.g. "sort_list"); rows whose task is None or "" get None, which TRL
    treats as "this reward does not apply". Binary on purpose: partial credit on random checks
    pays for special-casing the small inputs.
    """
    tasks = columns.get("task")
    if tasks is None:
        raise ValueError("code_reward needs a dataset column `task` naming a registered code task per row "
                         f"(one of {sorted(CODE_TASKS)}); the batch has columns {sorted(columns)}")
    if len(tasks) != len(completions):
        raise ValueError(f"code_reward: column `task` has {len(tasks)} rows but there are {len(completions)} completions")

    def score(pair) -> float | None:
        name, completion = pair
        if not name:
            return None
        task = get_code_task(name)
        source = extract_code(_completion_text(completion), task.entry_point)
        if source is None:
            return 0.0
        return 1.0 if verify_code(source, task).passed else 0.0

    # Each verification waits on its own child process; threads are enough to overlap them.
    with ThreadPoolExecutor(max_workers=max(1, min(len(completions), os.cpu_count() or 1))) as pool:
        return list(pool.map(score, zip(tasks, completions)))
