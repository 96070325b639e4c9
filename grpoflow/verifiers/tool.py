"""Model-written code run as a tool (the python_tool environment): the code sandbox's isolation
and limits, the whole source run once as a script, what it printed sent back.

    run = run_python("print(17 * 23)")
    run.output, run.error        # "391\n", None

The child is the code verifier's (_sandbox_child.py, in its script mode): the same launchers
(bubblewrap, or util-linux as root), rlimits, audit hook and restricted builtins as verify_code,
with DEFAULT_ALLOWED_IMPORTS. Where no OS isolation works it raises SandboxUnavailable unless
verifier.allow_unsandboxed is on, as the code reward does.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpoflow.verifiers.code import MAX_SOURCE_CHARS
from grpoflow.verifiers.code_tasks import DEFAULT_ALLOWED_IMPORTS
from grpoflow.verifiers.sandbox import SandboxLimits, run_in_sandbox

# A tool call's default limits: a GSM8K calculation takes milliseconds; a loop that runs away is
# stopped within a second of CPU time, so that one rollout cannot hold a generation up for long.
TOOL_LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_mb=256, output_mb=1)


@dataclass(frozen=True)
class ToolRun:
    output: str  # stdout and stderr together, as printed, cut to max_output_chars
    error: str | None  # what ended the run early: "ZeroDivisionError: division by zero", a limit...; None: ran to its end
    output_chars: int  # how long the output was before the cut


def run_python(source: str, *, limits: SandboxLimits = TOOL_LIMITS, max_output_chars: int = 1000) -> ToolRun:
    """Run `source` once in the sandbox; never raises for what the code does (SandboxUnavailable
    where no isolation works and unsandboxed runs are not allowed)."""
    if len(source) > MAX_SOURCE_CHARS:
        return ToolRun("", f"the code is {len(source)} characters; the limit is {MAX_SOURCE_CHARS}", 0)
    run = run_in_sandbox({"source": source, "entry_point": None, "args": [], "script": True,
                          "max_output_chars": max_output_chars, "allowed_imports": sorted(DEFAULT_ALLOWED_IMPORTS),
                          "forbidden_builtins": [], "forbidden_attributes": []}, limits)
    result = next((r for r in run.records if "output" in r), None)
    refusal = next((r for r in run.records if r.get("violation") or r.get("setup")), None)
    if refusal is not None:  # a syntax error, a forbidden import, or the audit hook stopping it
        kind = refusal.get("violation") or refusal.get("setup")
        output = result["output"] if result else ""
        return ToolRun(output, f"{kind}: {refusal.get('detail', '')}"[:300], len(output))
    if result is None or not any("done" in r for r in run.records):
        if run.killed_for == "wall":
            why = f"wall-clock limit of {limits.wall_seconds}s"
        elif run.cpu_seconds >= limits.cpu_seconds - 0.05 or run.exit_code in (-9, 128 + 9):
            # RLIMIT_CPU's hard limit ends it with SIGKILL (bubblewrap reports 128 + 9); on a busy
            # machine the CPU time the launcher passes back can fall short of the limit
            why = f"CPU limit of {limits.cpu_seconds}s"
        elif run.killed_for == "output":
            why = f"more than {limits.output_mb} MB of output"
        else:
            why = f"the process ended (exit code {run.exit_code})"
        output = result["output"] if result else ""
        return ToolRun(output, f"timeout: {why}" if "limit of" in why else f"crashed: {why}", len(output))
    error = f"{result['error']}: {result['detail']}" if result.get("error") else None
    return ToolRun(result["output"], error, result["output_chars"])
