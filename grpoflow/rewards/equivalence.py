"""`math_equivalence`: is the model's answer mathematically equal to the gold answer?

math-verify decides (0.5 = 1/2 = \\frac{1}{2}, \\boxed{72} = 72). It runs in a child process
(mathverify_server.py says why), so that scoring is safe from any thread and a pathological
answer costs at most ANSWER_TIMEOUT_S, never a hung training run.

Before math-verify sees them, both sides are prepared the way this library reads answers:
- a plain number goes through parse_number, so '1,000', '$1,000' and '1000 dollars' are 1000
  (math-verify alone reads '3,5' as 3.5; GSM8K-style data means thirty-five);
- LaTeX without math delimiters is wrapped in $...$: math-verify 0.9 finds '\\frac{1}{2}'
  bare but not '\\frac12', '\\dfrac{1}{2}' or '\\sqrt{2}/2'.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

from grpoflow.rewards.registry import register
from grpoflow.rewards.text import completion_text, extract_answer, parse_number

log = logging.getLogger("grpoflow.rewards")

SERVER = Path(__file__).with_name("mathverify_server.py")
ANSWER_TIMEOUT_S = 10.0  # the server's own alarms stop a check after about 6 s
START_TIMEOUT_S = 120.0  # importing sympy on a cold, slow disk
TAIL_CHARS = 4000  # answers are at the end; math-verify is not made to read a megabyte


class MathVerifyProcess:
    """One math-verify child process, started on first use, shared by all threads."""

    def __init__(self, answer_timeout_s: float = ANSWER_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S):
        self.answer_timeout_s = answer_timeout_s
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def equivalent(self, gold: str, answer: str) -> bool | None:
        """True/False; None when math-verify cannot read `gold` as math."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps([gold, answer]).encode() + b"\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                self._died()
            reply = self._read_line(self.answer_timeout_s)
            if reply is None:
                # Its alarms did not fire: stuck in C code. Killing it is the only way out.
                log.warning(
                    "math_equivalence: math-verify took over %.1f s on one answer; scored it 0.0 "
                    "and restarted math-verify. Answer starts: %r", self.answer_timeout_s, answer[:200],
                )
                self.close()
                return False
            return json.loads(reply)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _start(self) -> None:
        # start_new_session: Ctrl-C in the terminal stops the trainer, which then ends this.
        self._proc = subprocess.Popen(
            [sys.executable, "-P", str(SERVER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )
        if self._read_line(self.start_timeout_s) != b'"ready"\n':
            self.close()
            raise RuntimeError(
                f"math-verify did not start within {self.start_timeout_s:.0f} s "
                f"({sys.executable} -P {SERVER}); check that math-verify is installed"
            )

    def _read_line(self, timeout_s: float) -> bytes | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        if not line:
            self._died()
        return line

    def _died(self) -> None:
        code = self._proc.wait()
        self._proc = None
        raise RuntimeError(f"the math-verify process exited with code {code}; its error is above, on stderr")


_PROCESS = MathVerifyProcess()
atexit.register(_PROCESS.close)


@register("math_equivalence")
def math_equivalence(prompts, completions, answer, **_) -> list[float | None]:
    """1.0 when equal per math-verify, else 0.0; None when the gold answer is not math.

    Compares the last <answer>; without one, the end of the completion, where math-verify
    finds the last \\boxed{} or expression.
    """
    verdicts: dict[tuple[str, str], bool | None] = {}  # a group repeats the same answers
    rewards = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            rewards.append(None)
            continue
        text = completion_text(completion)
        extracted = extract_answer(text)
        if extracted is not None and _AMBIGUOUS_COMMA.fullmatch(extracted.strip()) and parse_number(extracted) is None:
            rewards.append(0.0)  # '3,5' or '2, 3': a decimal comma, or two numbers; data prep refuses it too
            continue
        candidate = _prepare(extracted) if extracted is not None else text
        candidate = candidate[-TAIL_CHARS:]
        key = (_prepare(str(gold)), candidate)
        if key not in verdicts:
            verdicts[key] = _PROCESS.equivalent(*key)
        rewards.append(None if verdicts[key] is None else float(verdicts[key]))
    return rewards


# Digits with commas that are not thousands groups (grpoflow.normalize reads '1,080' as 1080): math-verify
# would read '3,5' as 3.5, and '2, 3' as a set; neither is one number a gold answer can be compared with.
_AMBIGUOUS_COMMA = re.compile(r"-?\$?\s*\d+(?:\s*,\s*\d+)+(?:\.\d+)?")


def _prepare(answer: str) -> str:
    number = parse_number(answer)
    if number is not None:
        return number
    if "\\" in answer and "$" not in answer and "\\(" not in answer and "\\[" not in answer:
        return f"${answer}$"
    return answer
