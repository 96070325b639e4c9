"""`make serve`'s continuous deployment (one run at a time) when a run is killed from outside, against
`prefect server start`: the killed run must not keep the deployment's only concurrency slot."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.abandoned import OWNER, crash_abandoned_run
from grpoflow.reaper import descendants
from tests.drops import continuous_setup
from tests.processes import end

ROOT = Path(__file__).resolve().parents[1]


def write_config(root: Path, model: Path) -> Path:
    # 200 steps: a run still in its GRPO steps when it is killed
    return continuous_setup(root, model, drop_rows=8, grpo={"max_steps": 200, "per_device_train_batch_size": 4},
                            eval={"max_samples": 2, "max_new_tokens": 4}, min_new_rows=1, poll_seconds=3600)


def runs(api_url: str) -> list:
    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def trigger(api_url: str):
    from prefect.deployments import run_deployment

    with temporary_settings({PREFECT_API_URL: api_url}):
        return run_deployment("grpoflow-continuous/continuous-finetune", timeout=0)


def wait_for(what, deadline_s: float, check):
    deadline = time.monotonic() + deadline_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"waited {deadline_s} s for {what}"
        time.sleep(0.5)
    return found


def states(api_url: str) -> dict:
    return {r.id: r.state_name for r in runs(api_url)}


def test_a_run_killed_under_serve_frees_the_slot(prefect_ui_server, tiny_model, tmp_path):
    """What Prefect does: a run whose process is killed is reported crashed by the runner, which frees
    the slot. What we add: `serve` itself killed takes its runs' processes with it (grpoflow.reaper);
    each one, stopped by SIGTERM, reports itself crashed, so the slot is free for the next serve."""
    config = write_config(tmp_path, tiny_model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_ui_server, "PREFECT_HOME": str(tmp_path)}
    log = (tmp_path / "serve.log").open("w")

    def serve() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "grpoflow.cli", "serve", "-c", str(config)], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for("serve to start", 120, lambda: process.poll() is None and "being served" in (
            tmp_path / "serve.log").read_text().rsplit("Pausing all deployments", 1)[-1])
        return process

    def engine(process: subprocess.Popen, run_id) -> int:
        """The flow run's process, once it is running (in its GRPO steps)."""
        def find():
            checkpoints = list((tmp_path / "state" / "train").glob("*/checkpoints/step-*"))
            pids = [p for p in descendants(process.pid) if b"prefect.engine" in Path(f"/proc/{p}/cmdline").read_bytes()]
            running = states(prefect_ui_server).get(run_id) == "Running"
            return pids[0] if checkpoints and pids and running else None
        return wait_for("a run in its GRPO steps", 180, find)

    runner = serve()
    try:
        first = trigger(prefect_ui_server)
        os.kill(engine(runner, first.id), signal.SIGKILL)  # the run's process, killed from outside
        wait_for("the runner to report it crashed", 60, lambda: states(prefect_ui_server)[first.id] == "Crashed")
        second = trigger(prefect_ui_server)  # the slot is free: it runs
        pid = engine(runner, second.id)

        below = descendants(runner.pid)
        runner.kill()  # serve itself, killed from outside
        runner.wait()
        wait_for("serve's children to end", 15, lambda: not [p for p in below if Path(f"/proc/{p}").exists()])
        assert not Path(f"/proc/{pid}").exists()

        runner = serve()  # a new serve: the killed run is crashed (by itself or by serve), the next run gets the slot
        wait_for("the orphaned run to be crashed", 60, lambda: states(prefect_ui_server)[second.id] == "Crashed")
        third = trigger(prefect_ui_server)
        wait_for("the next run to start", 120, lambda: states(prefect_ui_server)[third.id] in ("Running", "Completed"))
    finally:
        end(runner, timeout=60, sig=signal.SIGINT)  # Ctrl-C; killed if still stopping its run after 60 s


def test_serve_reports_a_run_whose_process_is_gone(prefect_ui_server, tmp_path):
    """The part Prefect cannot do: a run left Running by a killed serve is reported crashed at the next start."""
    from prefect import flow
    from prefect.states import Running

    @flow(name="grpoflow-continuous-probe")
    def probe():
        pass

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    with temporary_settings({PREFECT_API_URL: prefect_ui_server}):
        async def make():
            async with get_client() as client:
                run = await client.create_flow_run(probe)
                await client.set_flow_run_state(run.id, Running())
                return run.id

        run_id = asyncio.run(make())
        (tmp_path / OWNER).write_text(json.dumps({"flow_run_id": str(run_id), "host": socket.gethostname(),
                                                  "pid": os.getpid(), "started": "now"}))
        assert crash_abandoned_run(tmp_path) is None  # a live process's run is left alone
        (tmp_path / OWNER).write_text(json.dumps({"flow_run_id": str(run_id), "host": socket.gethostname(),
                                                  "pid": dead, "started": "then"}))
        assert crash_abandoned_run(tmp_path) == str(run_id)
        state = {r.id: r.state for r in runs(prefect_ui_server)}[run_id]
        assert state.name == "Crashed" and f"pid {dead}" in state.message
        assert crash_abandoned_run(tmp_path) is None  # once: it is final now
