"""Progress that reaches logs, not only terminals.

A rich progress bar draws only on a terminal: in Prefect's UI, a CI log or `nohup ... > run.log` it
shows nothing, and a 19-minute training run looked dead. So where no bar draws, the work says how far
it is through `logging` (which Prefect forwards to the task's logs, flows/__init__.py): a line per unit
of work (a GRPO step, an evaluation batch, an export file), and, from `Heartbeat`, a line saying what
is running whenever nothing was said for `every` seconds (a CPU step of SmolLM2 takes minutes).
On a terminal the bar is the progress, and these lines are not written twice.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from rich.console import Console

HEARTBEAT_SECONDS = 30.0


def bar_draws(console: Console | None = None) -> bool:
    """Does a rich bar on this console (default: stderr, where grpoflow's bars go) draw?"""
    console = console or Console(stderr=True)
    return console.is_terminal and not console.is_dumb_terminal


def duration(seconds: float) -> str:
    """'45s', '3m 05s', '1h 02m': for ETAs and heartbeats."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class Heartbeat:
    """A thread that logs `<what>: <phase>, <n>s so far` when nothing reached the "grpoflow" loggers
    for `every` seconds (any line counts: a step's, a batch's, a warning). `phase` says what runs now.

    The thread runs in a copy of the caller's context, so Prefect files its lines under the task run
    that started it. enabled=False: no thread (a terminal, where the bar shows time passing)."""

    def __init__(self, logger: logging.Logger, what: str, *, every: float = HEARTBEAT_SECONDS, enabled: bool = True):
        self.logger, self.what, self.every, self.enabled = logger, what, every, enabled
        self._phase = "starting"
        self._phase_since = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def phase(self, text: str) -> None:
        self._phase, self._phase_since = text, time.monotonic()

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self._watch = _LastRecord(self)
            logging.getLogger("grpoflow").addHandler(self._watch)
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._beat,), daemon=True,
                                            name=f"heartbeat {self.what}")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            logging.getLogger("grpoflow").removeHandler(self._watch)

    def _beat(self) -> None:
        while not self._stop.wait(min(self.every, max(0.05, self.every - (time.monotonic() - self._last)))):
            now = time.monotonic()
            if now - self._last >= self.every:
                self.logger.info("%s: %s, %s so far", self.what, self._phase, duration(now - self._phase_since))
                self._last = now


class _LastRecord(logging.Handler):
    """Notes when the "grpoflow" loggers last wrote a line, for the heartbeat."""

    def __init__(self, heartbeat: Heartbeat):
        super().__init__()
        self.heartbeat = heartbeat

    def emit(self, record: logging.LogRecord) -> None:
        self.heartbeat._last = time.monotonic()
