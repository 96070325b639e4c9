"""Verifiers: decide whether a model's answer is right, hard to fool, for use as GRPO rewards."""

from grpoflow.verifiers.code import Verdict, code_reward, draw_checks, extract_code, verify_code
from grpoflow.verifiers.code_tasks import CODE_TASKS, CodeTask, get_code_task, register_code_task
from grpoflow.verifiers.sandbox import SandboxLimits, SandboxUnavailable, allow_unsandboxed, isolation

__all__ = [
    "CODE_TASKS", "CodeTask", "SandboxLimits", "SandboxUnavailable", "Verdict", "allow_unsandboxed", "code_reward",
    "draw_checks", "extract_code", "get_code_task", "isolation", "register_code_task", "verify_code",
]
