"""A continuous run whose process is gone, still "Running" on the Prefect server.

The served continuous deployment runs one flow run at a time (a concurrency limit of 1). Prefect
frees that slot when a run ends, and when the runner sees a run's process die. Kill `make serve`
itself and nobody is left to report: the run stays Running and holds the slot until its lease
expires. So each continuous run writes who it is (flow run id, host, pid) in its state folder, and
`serve` at start reports the one it finds there crashed when its process is gone from this host:

    claim_state_dir(state)       # the flow, at start
    crash_abandoned_run(state)   # serve, before it serves
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Crashed
from prefect.utilities.asyncutils import run_coro_as_sync

from grpoflow.atomic import process_alive, write_atomic
from grpoflow.clock import now_iso

log = logging.getLogger("grpoflow.continuous")

OWNER = "owner.json"


def claim_state_dir(state: Path) -> None:
    owner = {"flow_run_id": str(flow_run.id), "host": socket.gethostname(), "pid": os.getpid(),
             "started": now_iso()}
    write_atomic(state / OWNER, json.dumps(owner) + "\n")


def crash_abandoned_run(state: Path) -> str | None:
    """Report the last continuous run crashed if it is still running on the server but its process is
    gone from this host; its flow run id, or None."""
    path = state / OWNER
    if not path.is_file():
        return None
    owner = json.loads(path.read_text())
    if owner["host"] != socket.gethostname() or process_alive(owner["pid"]) or not owner["flow_run_id"]:
        return None

    async def crash() -> str | None:
        async with get_client() as client:
            run = await client.read_flow_run(owner["flow_run_id"])
            if run.state is None or run.state.is_final():
                return None
            message = (f"its process (pid {owner['pid']} on {owner['host']}) is gone: reported by "
                       "`python -m flows.deploy serve` at start")
            await client.set_flow_run_state(run.id, Crashed(message=message))
            return str(run.id)

    crashed = run_coro_as_sync(crash())
    if crashed:
        log.warning("flow run %s was still running on the server, but its process is gone: reported it crashed, "
                    "which frees the continuous deployment's slot", crashed)
    return crashed
