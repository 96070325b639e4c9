"""One asyncio event loop on a daemon thread, where async reward functions are awaited.

Why a thread of its own: sync rewards keep running in the caller's thread (as in TRL; reward
code that uses signal-based timeouts needs the main thread) while the async ones make progress
here at the same time; and scoring works whether or not the caller already runs a loop.
One loop for the process, so an async reward can keep a client session across batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Coroutine

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def submit(coroutine: Coroutine) -> concurrent.futures.Future:
    """Schedule `coroutine` on the background loop; .result() on the future waits for it."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="grpoflow-rewards", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _loop)
