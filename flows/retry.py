"""Which failures a stage task retries, and how long it waits: transient ones, with exponential backoff."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from grpoflow.config import OrchestrationConfig
from grpoflow.errors import UserError

# A user's mistake does not get better by retrying; anything else (I/O, a flaky Hub) may. (The Hub
# push retries its transient errors itself, with backoff.)
USER_ERRORS = (UserError,)


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except USER_ERRORS:
        return False
    except Exception:
        return True
    return False


def retry_options(orchestration: OrchestrationConfig) -> dict[str, Any]:
    """retry_delay_seconds before the first retry, doubling after each (with jitter, so that tasks
    failing together do not retry together)."""
    delays = exponential_backoff(backoff_factor=orchestration.retry_delay_seconds)(orchestration.retries)
    return {"retries": orchestration.retries, "retry_delay_seconds": delays or 0, "retry_jitter_factor": 0.2}
