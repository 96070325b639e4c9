"""Deployments against `prefect server start` (a real server with its scheduler, not the ephemeral API)."""

from __future__ import annotations

import asyncio
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.deploy import served_deployments
from grpoflow.config import validate_config


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
