"""A graceful stop: SIGTERM asks the work to end at its next safe point, a second SIGTERM ends it now.

    stop_on_sigterm()         # the command that owns the process installs it
    keep_graceful_stop()      # each flow body, where Prefect installed its own handler
    ...
    if stop_requested():      # the trainer after an optimizer step (having saved a checkpoint),
        raise StopRequested   # the continuous flow between its tasks

StopRequested is a BaseException, like KeyboardInterrupt: no `except Exception` and no task retry
catches it, and Prefect records the run as crashed rather than failed, so nothing half-done is cached.

A launcher asks the processes it started (torchrun's ranks) through a file: where GRPOFLOW_STOP_FILE
names one, its existence is a stop request too (grpoflow/launch.py writes it when its own process is
asked), so the ranks stop together at their next step, however long the step takes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("grpoflow")

_requested = threading.Event()


class StopRequested(BaseException):
    """The work stopped at a safe point because it was asked to; the same command resumes it."""


STOP_FILE_ENV = "GRPOFLOW_STOP_FILE"


def stop_requested() -> bool:
    if _requested.is_set():
        return True
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def request_stop() -> None:
    _requested.set()


def wait_for_stop(seconds: float) -> bool:
    """Sleep up to `seconds`, waking early when a stop is asked; whether it was."""
    deadline = time.monotonic() + seconds
    while not _requested.is_set() and (left := deadline - time.monotonic()) > 0:
        _requested.wait(min(left, 1.0))
    return _requested.is_set()


def clear_stop() -> None:
    _requested.clear()


def _on_sigterm(signum, frame) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt("a second SIGTERM")
    log.warning("SIGTERM: stopping after the current step (a checkpoint is written); send it again to stop now")
    _requested.set()


_armed = False


def stop_on_sigterm() -> None:
    """SIGTERM: finish (or checkpoint) the current step, then stop. A second SIGTERM: stop now.
    For a process this command owns (`grpoflow continuous`); a flow served by Prefect keeps Prefect's."""
    global _armed
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return
    _armed = True
    signal.signal(signal.SIGTERM, _on_sigterm)


def keep_graceful_stop() -> None:
    """At the top of a flow's body: Prefect's flow engine puts its own SIGTERM handler in place for
    every flow run (it marks the run crashed at once); where stop_on_sigterm was asked for, ours
    comes back for the body. Prefect restores the handler it found when the run ends."""
    if _armed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def check_stop(where: str) -> None:
    if _requested.is_set():
        raise StopRequested(f"stopped {where}, as asked (SIGTERM); run the same command to resume")
