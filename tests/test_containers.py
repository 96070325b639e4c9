"""The Dockerfiles, checked statically (containers/README.md says how they were built and run).

Each file must parse into known instructions, start FROM a pinned base, COPY only paths that
exist in the repository, and run an entrypoint that is this project's console script with a
command line the CLI accepts.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the project's images; python-base.Dockerfile is the local base grpoflow-gpu builds on without a registry
PYTHON_BASE = ROOT / "containers" / "python-base.Dockerfile"
DOCKERFILES = sorted(p for p in (ROOT / "containers").glob("*.Dockerfile") if p != PYTHON_BASE)
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword, args.strip()))
            pending = ""
    assert not pending, f"{path.name}: a continuation line runs off the end"
    return out


def test_there_are_the_two_images():
    assert {p.name for p in DOCKERFILES} == {"cpu.Dockerfile", "gpu.Dockerfile"}


def test_the_local_python_base_parses():
    """containers/build.sh builds it from a context holding only python.tar (the host's CPython 3.12)."""
    steps = instructions(PYTHON_BASE)
    assert all(k in INSTRUCTIONS for k, _ in steps), steps
    assert steps[0] == ("ARG", "BASE=localhost/debian:bookworm") and steps[1] == ("FROM", "${BASE}")
    assert ("ADD", "python.tar /usr/local/") in steps and not any(k == "COPY" for k, _ in steps)
    build = (ROOT / "containers" / "build.sh").read_text()
    assert "-f containers/python-base.Dockerfile" in build and '"$context/python.tar"' in build


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_points_at_what_exists(path):
    from grpoflow.cli import _parser

    steps = instructions(path)
    unknown = [k for k, _ in steps if k.upper() not in INSTRUCTIONS or k != k.upper()]
    assert not unknown, f"{path.name}: unknown instructions {unknown}"
    # the base is a build argument whose default is a tagged public image
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE=") and ":" in steps[0][1], steps[0]
    assert steps[1] == ("FROM", "${BASE}"), "the first stage is FROM the BASE argument"
    for keyword, args in steps:
        if keyword == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: not in the repository"
    entrypoint = json.loads(next(a for k, a in steps if k == "ENTRYPOINT"))
    cmd = json.loads(next(a for k, a in steps if k == "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["grpoflow"] and "grpoflow" in scripts
    args = _parser().parse_args(cmd)  # argparse exits on a command line the CLI does not accept
    assert args.handler is not None
    config = next((cmd[i + 1] for i, a in enumerate(cmd) if a in ("-c", "--config")), None)
    assert config is None or (ROOT / config).is_file()
    installs = " ".join(a for k, a in steps if k == "RUN")
    # every package from a committed lock, hashes checked; the project itself without resolving anything
    lock = "requirements/gpu.txt" if path.name == "gpu.Dockerfile" else "requirements/cpu.txt"
    for needed in (f"--require-hashes --no-deps -r {lock}", "--require-hashes --no-deps -r requirements/data.txt"):
        assert needed in " ".join(installs.split()), f"{path.name}: no `pip install {needed}`"
    assert (ROOT / lock).is_file()
    for command in installs.split("&&"):
        if "pip install" in command:
            assert "--no-deps" in command, f"{path.name}: `{command.strip()}` resolves dependencies outside the lock"


# -- the stages on a Prefect docker work pool (no Docker engine: the job each deployment would start is
# built by prefect-docker's own job configuration and docker-py's own argument conversion, not run)


def test_stage_deployments_on_a_docker_work_pool(prefect_ui_server, tmp_path):
    import asyncio

    from docker.models.containers import _create_container_args
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_docker.worker import DockerWorkerJobConfiguration

    from flows.deploy import IMAGE_WORKDIR, apply_docker
    from grpoflow.config import validate_config

    cfg = validate_config({"orchestration": {"schedule_cron": "0 4 * * 1"}})
    with temporary_settings({PREFECT_API_URL: prefect_ui_server}):
        apply_docker(cfg, "grpoflow-docker-test", artifacts=tmp_path / "artifacts", cache=tmp_path / "cache")

        async def read():
            async with get_client() as client:
                pool = await client.read_work_pool("grpoflow-docker-test")
                names = ["grpoflow-pipeline/stage-prepare", "grpoflow-pipeline/stage-train",
                         "grpoflow-pipeline/stage-evaluate", "grpoflow-staged/containers"]
                deployments = [await client.read_deployment_by_name(n) for n in names]
                jobs = [await DockerWorkerJobConfiguration.from_template_and_values(pool.base_job_template,
                                                                                    d.job_variables, client=client)
                        for d in deployments]
                return pool, deployments, jobs

        pool, deployments, jobs = asyncio.run(read())
    assert pool.type == "docker"
    prepare, train, evaluate, parent = deployments
    assert [d.parameters["config"]["orchestration"]["stages"] for d in (prepare, train, evaluate)] == [
        ["prepare", "model"], ["train"], ["evaluate", "export"]]
    assert [s.schedule.cron for s in parent.schedules] == ["0 4 * * 1"]
    dockerfiles = {f"grpoflow-{p.name.removesuffix('.Dockerfile')}": p for p in DOCKERFILES}
    for deployment, job in zip(deployments, jobs):
        assert deployment.work_pool_name == "grpoflow-docker-test"
        name, _, tag = job.image.partition(":")
        assert name in dockerfiles and tag, f"{deployment.name}: {job.image} is not one of containers/*.Dockerfile"
        steps = instructions(dockerfiles[name])
        # the flow's entrypoint is a file the image holds, relative to its working directory
        assert ("WORKDIR", IMAGE_WORKDIR) in steps
        path, _, function = deployment.entrypoint.partition(":")
        assert (ROOT / path).is_file() and f"def {function}(" in (ROOT / path).read_text()
        assert any(k == "COPY" and shlex.split(a)[0] == path.split("/")[0] for k, a in steps)
        # nothing to fetch: the code is in the image, and the flow runs in its working directory, where the
        # volumes are mounted (not in a copy made by `prefect flow-run execute`)
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}]
        assert job.volumes == [f"{(tmp_path / 'artifacts').resolve()}:{IMAGE_WORKDIR}/artifacts",
                               f"{(tmp_path / 'cache').resolve()}:{IMAGE_WORKDIR}/cache"]
        # the container the worker would create: its command (prefect flow-run execute) behind /usr/bin/env,
        # not behind the images' grpoflow entrypoint
        extra = dict(job.container_create_kwargs)
        args = _create_container_args({"image": job.image, "command": "prefect flow-run execute", "version": "1.44",
                                       "volumes": job.volumes, "environment": job.env, **extra})
        assert args["entrypoint"] == ["/usr/bin/env"] and args["working_dir"] == IMAGE_WORKDIR
        gpu = args["host_config"].get("DeviceRequests")
        assert bool(gpu) == (name == "grpoflow-gpu"), deployment.name
    assert train.job_variables["container_create_kwargs"]["ipc_mode"] == "host"
    assert jobs[1].image == "grpoflow-gpu:latest" and {j.image for j in (jobs[0], jobs[2], jobs[3])} == {
        "grpoflow-cpu:latest"}


def test_the_images_install_prefect_for_the_worker_command():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("prefect") for d in dependencies)  # `prefect flow-run execute` runs in every image
    for path in DOCKERFILES:
        installs = " ".join(a for k, a in instructions(path) if k == "RUN")
        assert "pip install --no-deps --no-build-isolation '.[" in installs, f"{path.name}: the project is not installed"
        lock = ROOT / re.search(r"-r (requirements/(cpu|gpu)\.txt)", installs).group(1)
        assert re.search(r"^prefect==", lock.read_text(), flags=re.M), f"{lock.name} does not pin prefect"


def test_the_kubernetes_gpu_job_template_uses_every_variable_it_declares():
    """Prefect passes a variable to the job only where job_configuration references it."""
    template = json.loads((ROOT / "containers" / "k8s-gpu-job-template.json").read_text())
    used = json.dumps(template["job_configuration"])
    declared = template["variables"]["properties"]
    assert [name for name in declared if "{{ " + name + " }}" not in used] == []
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
