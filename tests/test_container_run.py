"""The stages in the grpoflow-cpu image, run by a real Prefect docker worker (containers/README.md).

containers/build.sh builds the image (`make images`; layers and the base are cached between runs);
podman serves the Docker API on a socket of this test's own; `python -m flows.deploy docker --no-gpu`
registers the deployments on a real `prefect server start`; a real `prefect worker start --type docker`
runs each flow run in a container that writes to the mounted artifacts folder; while the server is still
up, headless Chromium checks the Prefect UI shows those runs, their task runs and artifacts. Also checks
grpoflow-gpu's base (Python 3.12, made locally where no registry answers). Skips where neither podman nor
a running docker daemon is here (`make containers-setup` installs podman).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import end

ROOT = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
DOCKER = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0

POOL = "grpoflow-containers-test"  # the docker work pool the test registers its deployments on
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (PODMAN or DOCKER),
                                 reason="no container engine: podman (make containers-setup) or a running docker daemon")]


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    if PODMAN:
        env["CONTAINERS_CONF"] = str(ROOT / ".cache" / "containers" / "containers.conf")  # written by build.sh
    return env


@pytest.fixture(scope="module")
def image():
    """grpoflow-cpu, built as `make images` builds it."""
    subprocess.run([str(ROOT / "containers" / "build.sh"), "cpu"], cwd=ROOT, check=True, timeout=3600,
                   env={**os.environ, "PYTHON": sys.executable})
    return "grpoflow-cpu:latest"


@pytest.fixture(scope="module")
def docker_host(image, tmp_path_factory):
    """A Docker API socket: podman's, served for this test, or the running docker daemon's."""
    if not PODMAN:
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen([PODMAN, "system", "service", "--time=0", f"unix://{socket}"], env=engine_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert service.poll() is None, f"podman system service exited {service.returncode}"
            assert time.monotonic() < deadline, "podman system service made no socket in 60 s"
            time.sleep(0.2)
        yield f"unix://{socket}"
    finally:
        end(service, timeout=20)


def small_source(path: Path) -> None:
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def containers_of(deployment_ids: set[str]) -> list[str]:
    """The containers the worker made for these deployments, running or not."""
    listing = subprocess.run([PODMAN or "docker", "ps", "-a", "--format", "{{.ID}} {{.Labels}}"], env=engine_env(),
                             capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if any(d in line for d in deployment_ids)]


@dataclass
class StagedRun:
    """What one run of grpoflow-staged/containers left: its flow runs, as the API reads them back."""
    parent: Any  # prefect's FlowRun
    children: list[Any]  # the parent's child flow runs
    deployment_ids: set[str]
    artifacts: Path
    worker_log: str
    seconds: float
    leftover: list[str]  # containers of its deployments still there after the cleanup


@pytest.fixture(scope="module")
def staged_run(image, docker_host, prefect_ui_server, tiny_model, tmp_path_factory) -> StagedRun:
    """grpoflow-staged/containers, run once by a real docker worker; the tests below read what it left
    (the Prefect server stays up for the module, so the browser test opens the same runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, WorkPoolFilter,
                                                WorkPoolFilterName)
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import main as deploy

    folder = tmp_path_factory.mktemp("staged")
    # Every path relative to the working directory: /opt/grpoflow in the containers, the folder here.
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        artifacts = folder / "artifacts"
        artifacts.mkdir()
        (folder / "cache").mkdir()  # podman, unlike docker, makes no missing folder it is asked to mount
        small_source(artifacts / "train.jsonl")
        shutil.copytree(tiny_model, artifacts / "tiny-model")
        config = {"data": {"source": "artifacts/train.jsonl", "output_dir": "artifacts/data"},
                  "model": {"name_or_path": "artifacts/tiny-model", "finetune": "lora", "dtype": "float32",
                            "lora": {"target_modules": ["q_proj", "v_proj"]}},
                  "grpo": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 4,
                           "max_completion_length": 8, "gradient_checkpointing": False,
                           "warmup": {"rows": 4, "batch_size": 4, "eval_prompts": 2}, "output_dir": "artifacts/train"},
                  "eval": {"max_samples": 3, "max_new_tokens": 8, "output_dir": "artifacts/eval"},
                  "export": {"quantizations": ["q8_0"], "output_dir": "artifacts/export"}}
        (folder / "tiny.yaml").write_text(json.dumps(config))  # JSON is YAML
        env = {**engine_env(), "PREFECT_API_URL": prefect_ui_server, "DOCKER_HOST": docker_host}
        deployment_ids = set()
        worker = None
        try:
            with temporary_settings({PREFECT_API_URL: prefect_ui_server}):
                assert deploy(["docker", "-c", "tiny.yaml", "--work-pool", POOL, "--artifacts", "artifacts",
                               "--cache", "cache", "--no-gpu"]) == 0

                async def host_network() -> set[str]:
                    # the server listens on 127.0.0.1 here: the containers share the host's network to reach it
                    async with get_client() as client:
                        template = (await client.read_work_pool(POOL)).base_job_template
                        template["variables"]["properties"]["network_mode"]["default"] = "host"
                        await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=template))
                        found = await client.read_deployments(
                            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL])))
                        return {str(d.id) for d in found}

                deployment_ids = asyncio.run(host_network())
                log = (folder / "worker.log").open("w")
                worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                           "--type", "docker"], env=env, stdout=log, stderr=subprocess.STDOUT)
                started = time.monotonic()
                parent = run_deployment("grpoflow-staged/containers", timeout=2400)
                seconds = time.monotonic() - started

                async def children():
                    async with get_client() as client:
                        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))

                runs = asyncio.run(children())
        finally:
            if worker is not None:
                end(worker, timeout=30)
            leftover = containers_of(deployment_ids)
            if leftover:
                subprocess.run([PODMAN or "docker", "rm", "-f", *leftover], env=engine_env(), capture_output=True)
    return StagedRun(parent=parent, children=runs, deployment_ids=deployment_ids, artifacts=artifacts,
                     worker_log=(folder / "worker.log").read_text(), seconds=seconds,
                     leftover=containers_of(deployment_ids))


def stage_run(staged: StagedRun, stages: list[str]) -> Any:
    """The child flow run of the stage deployment that runs these stages."""
    found = [r for r in staged.children if str(r.deployment_id) in staged.deployment_ids
             and r.parameters["config"]["orchestration"]["stages"] == stages]
    assert len(found) == 1, [(r.name, r.parameters["config"]["orchestration"]["stages"]) for r in staged.children]
    return found[0]


def test_the_stages_run_in_containers_through_a_docker_worker(staged_run):
    parent, runs, artifacts = staged_run.parent, staged_run.children, staged_run.artifacts
    assert parent.state.is_completed(), f"{parent.state}; worker log:\n{staged_run.worker_log[-4000:]}"
    # the three stage runs, each from its deployment, each in a container of the worker's
    # (prefect-docker records "<docker host>:<container id>" as the run's infrastructure pid)
    stage_runs = [r for r in runs if str(r.deployment_id) in staged_run.deployment_ids]
    assert len(stage_runs) == 3 and all(r.state.is_completed() for r in stage_runs), [
        (r.name, r.state_name) for r in runs]
    for run in [parent, *stage_runs]:
        assert run.infrastructure_pid and ":" in run.infrastructure_pid, (run.name, run.infrastructure_pid)
    print(f"the staged flow run took {staged_run.seconds:.0f} s in containers")
    # what the containers wrote to the mounted folder
    assert {p.name for p in (artifacts / "data").rglob("*.parquet")} == {"train.parquet", "heldout.parquet",
                                                                          "rejects.parquet"}
    assert any((artifacts / "train").rglob("adapter_model.safetensors")), "train wrote no adapter"
    assert any((artifacts / "eval").rglob("summary.json")), "evaluate wrote no summary"
    assert {p.name for p in (artifacts / "export").rglob("*.gguf")} == {"model-f16.gguf", "model-q8_0.gguf"}
    assert staged_run.leftover == []


def test_the_prefect_ui_shows_the_containerized_flow_run(staged_run, prefect_ui_server, tmp_path):
    """Headless Chromium (tests/ui/, as tests/test_ui.py drives it) opens the staged flow run, whose Subflow
    Runs tab lists the three stage runs with their deployments and task runs, then the evaluate stage's
    run, which ran in a grpoflow-cpu container: its header (deployment, work pool, parent run), its task
    runs, its artifacts and the evaluation table. Screenshots: the test's tmp folder."""
    from test_ui import CHROMIUM, UI, playwright_core  # tests/ is on sys.path under pytest

    from flows.deploy import STAGE_GROUPS
    from flows.pipeline import TASK_NAMES
    from stages.dag import stages_to_run

    if not Path(CHROMIUM).is_file() or shutil.which("node") is None:
        pytest.skip("no chromium or node (make ui-test-setup installs Debian's)")
    assert staged_run.parent.state.is_completed(), staged_run.parent.state
    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = {**os.environ, "PLAYWRIGHT_DIR": str(playwright_core()), "CHROMIUM": CHROMIUM}
    ui = prefect_ui_server.removesuffix("/api")
    print(f"screenshots: {shots}")

    # the parent: one subflow run per stage deployment, each with the task runs of its stages
    expected = []
    for name, (stages, _) in STAGE_GROUPS.items():
        run = stage_run(staged_run, list(stages))
        tasks = len(stages_to_run(list(stages)))  # the stages it reads rerun, as cache hits
        expected += [f"stage-{name}", run.name, f"{tasks} Task run{'s' if tasks > 1 else ''}"]
    done = subprocess.run(["node", str(UI / "check_subflow_runs.mjs"), f"{ui}/runs/flow-run/{staged_run.parent.id}",
                           str(shots), str(len(STAGE_GROUPS)), ",".join(expected)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr

    # the evaluate stage's run
    run = stage_run(staged_run, ["evaluate", "export"])
    tasks = [TASK_NAMES[s] for s in stages_to_run(["evaluate", "export"])]
    page = ["stage-evaluate", POOL, staged_run.parent.name,
            "data-manifest", "training", "evaluation", "export", "pipeline-summary"]
    done = subprocess.run(["node", str(UI / "check_flow_run.mjs"), f"{ui}/runs/flow-run/{run.id}", str(shots),
                           ",".join(tasks), "evaluation", "accuracy (last number),questions scored,base,trained",
                           ",".join(page)], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen["tasks"]) == set(tasks)
    assert seen["title"] == run.name == "tiny-model on train.jsonl, steps 1-2"
    assert seen["page"]["missing"] == []
    rows = [[cell.strip() for cell in r.split("\t")] for r in seen["artifact"]["rows"]]
    assert rows[0] == ["metric", "base", "trained"]
    assert ["questions scored", "3", "3"] in rows
    assert {p.name for p in shots.glob("*.png")} == {"flow-run-subflow-runs.png", "flow-run-task-runs.png",
                                                     "flow-run-artifacts.png", "flow-run-evaluation.png"}


def test_the_gpu_image_base_has_python_3_12():
    """grpoflow-gpu's base as `containers/build.sh gpu` finds it: python:3.12-slim-bookworm where a registry
    answers, else localhost/python:3.12-bookworm, made (once) from the Debian base and this host's CPython
    3.12. The GPU image itself is not built by the tests: 9.7 GB of CUDA wheels (containers/README.md)."""
    done = subprocess.run([str(ROOT / "containers" / "build.sh"), "gpu-base"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "PYTHON": sys.executable})
    if done.returncode and "no Python 3.12 here" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    base = done.stdout.strip().splitlines()[-1].removeprefix("grpoflow-gpu's base: ")
    probe = ("import sys, bz2, ctypes, decimal, hashlib, lzma, sqlite3, ssl, uuid, zlib; "
             "print(sys.version_info[:2] == (3, 12), ssl.OPENSSL_VERSION)")
    ran = subprocess.run([PODMAN or "docker", "run", "--rm", "--network", "none", base, "sh", "-c",
                          f"python3 -c '{probe}' && pip --version"], env=engine_env(), capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    first, second = ran.stdout.splitlines()
    assert first.startswith("True OpenSSL") and "(python 3.12)" in second, ran.stdout
