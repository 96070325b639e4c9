"""Deployments against `prefect server start` (a real server with its scheduler, not the ephemeral API)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.deploy import served_deployments
from grpoflow.config import validate_config

ROOT = Path(__file__).resolve().parents[1]


def read(coroutine_fn):
    async def run():
        async with get_client() as client:
            return await coroutine_fn(client)

    return asyncio.run(run())


def test_served_deployments_have_their_schedules_and_the_config(prefect_ui_server, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"question": "What is 1 plus 1?", "answer": "#### 2"}\n')
    cfg = validate_config({"orchestration": {"schedule_cron": "*/5 * * * *"}, "grpo": {"max_steps": 3},
                           "continuous": {"heldout": str(heldout), "poll_seconds": 600}})
    with temporary_settings({PREFECT_API_URL: prefect_ui_server}):
        ids = [d.apply() for d in served_deployments(cfg)]
        pipeline = read(lambda c: c.read_deployment_by_name("grpoflow-pipeline/scheduled-retraining"))
        assert [s.schedule.cron for s in pipeline.schedules] == ["*/5 * * * *"] and pipeline.schedules[0].active
        assert pipeline.parameters["config"] == cfg.model_dump(mode="json")  # the parameters are the config
        assert pipeline.entrypoint == "flows/pipeline.py:pipeline"
        watcher = read(lambda c: c.read_deployment_by_name("grpoflow-continuous/continuous-finetune"))
        assert [s.schedule.interval.total_seconds() for s in watcher.schedules] == [600]
        assert watcher.global_concurrency_limit.limit == 1  # never two looks at the drops at once
        assert watcher.parameters["config"]["continuous"]["heldout"] == str(heldout)

        # the server's scheduler plans runs from the cron schedule
        deadline = time.monotonic() + 60
        while True:
            runs = read(lambda c: c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                any_=[ids[0]])), flow_run_filter=FlowRunFilter()))
            if runs or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert runs and all(r.state.name == "Scheduled" for r in runs)
        minutes = sorted({r.expected_start_time.minute % 5 for r in runs})
        assert minutes == [0], [r.expected_start_time for r in runs]


def test_without_a_heldout_file_only_the_pipeline_is_served():
    assert [d.name for d in served_deployments(validate_config({}))] == ["scheduled-retraining"]


def test_a_bad_cron_is_named_before_anything_registers():
    from flows.deploy import main

    assert main(["serve", "--set", "orchestration.schedule_cron=every day"]) == 2


def test_grpoflow_deploy_registers_the_stage_deployments_on_a_docker_pool(prefect_ui_server, tmp_path):
    """`grpoflow deploy`, as a user runs it: a docker work pool, the three stage deployments in their
    images with the volumes, and the staged flow; what a worker needs to run them is on the server."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_ui_server, "PREFECT_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "grpoflow.cli", "deploy", "--work-pool", "test-pool",
                           "--artifacts", str(tmp_path / "artifacts"), "--cache", str(tmp_path / "cache"),
                           "--set", "grpo.max_steps=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    assert printed["work_pool"] == "test-pool" and len(printed["deployments"]) == 4
    assert "prefect worker start --pool test-pool --type docker" in done.stdout + done.stderr

    with temporary_settings({PREFECT_API_URL: prefect_ui_server}):
        pool = read(lambda c: c.read_work_pool("test-pool"))
        assert pool.type == "docker"
        found = {d.name: d for d in (read(lambda c: c.read_deployment(i)) for i in printed["deployments"])}
    assert set(found) == {"stage-prepare", "stage-train", "stage-evaluate", "containers"}
    train = found["stage-train"]
    assert train.job_variables["image"] == "grpoflow-gpu:latest"
    assert train.job_variables["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert f"{(tmp_path / 'artifacts').resolve()}:/opt/grpoflow/artifacts" in train.job_variables["volumes"]
    assert train.parameters["config"]["orchestration"]["stages"] == ["train"]
    assert train.parameters["config"]["grpo"]["max_steps"] == 2  # --set reached the deployments
    assert found["stage-prepare"].job_variables["image"] == "grpoflow-cpu:latest"
    assert all(d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/grpoflow"}}]
               for d in found.values())

    # --no-gpu: train in the CPU image with no device requested
    done = subprocess.run([sys.executable, "-m", "grpoflow.cli", "deploy", "--work-pool", "test-pool", "--no-gpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with temporary_settings({PREFECT_API_URL: prefect_ui_server}):
        train = read(lambda c: c.read_deployment_by_name("grpoflow-pipeline/stage-train"))
    assert train.job_variables["image"] == "grpoflow-cpu:latest"
    assert "device_requests" not in train.job_variables["container_create_kwargs"]
