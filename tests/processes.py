"""Ending the servers and workers the tests start, with nothing left running."""

from __future__ import annotations

import signal
import subprocess


def end(process: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig` (SIGTERM: stop), wait up to `timeout` seconds, then kill: a process still stopping
    on a loaded machine does not outlive its test."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
