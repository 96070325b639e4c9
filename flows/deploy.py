"""Deployments: scheduled retraining, continuous fine-tuning, and the stages in their containers.

    make server                                      prefect server start (UI on http://127.0.0.1:4200)
    make serve CONFIG=...                            python -m flows.deploy serve: the two deployments
                                                     below, registered and run by this process
    python -m flows.deploy docker -c CONFIG          the stage deployments on a docker work pool

serve:
    grpoflow-pipeline/scheduled-retraining    the pipeline at orchestration.schedule_cron
    grpoflow-continuous/continuous-finetune   one look at continuous.drop_dir every continuous.poll_seconds,
                                              never two at once (registered when continuous.heldout is set)
docker (a Prefect docker work pool; a docker worker runs each flow run in its image):
    grpoflow-pipeline/stage-prepare     prepare, model          grpoflow-cpu
    grpoflow-pipeline/stage-train       train                   grpoflow-gpu (all GPUs, host IPC);
                                                                grpoflow-cpu with --no-gpu
    grpoflow-pipeline/stage-evaluate    evaluate, export        grpoflow-cpu
    grpoflow-staged/containers          runs the three in order (at orchestration.schedule_cron)

Every deployment's parameters are the pipeline config (`config`), so a run from the UI can change any key.
The stages share artifacts/ and the model cache through volumes: what a stage reads from an earlier
one it finds there (each stage is keyed by content hash, so an earlier stage asked again is a cache hit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (offline Prefect defaults, before prefect is imported)
from prefect import flow, get_run_logger, serve
from prefect.deployments import run_deployment
from prefect.deployments.runner import RunnerDeployment

from flows.abandoned import crash_abandoned_run
from flows.continuous import continuous
from flows.pipeline import pipeline
from grpoflow.config import ConfigError, PipelineConfig, load_config, validate_config
from grpoflow.reaper import watch_children

# Inside the images (containers/*.Dockerfile): the working directory, where flows/ and configs/ are.
IMAGE_WORKDIR = "/opt/grpoflow"
IMAGES = {"cpu": "grpoflow-cpu:latest", "gpu": "grpoflow-gpu:latest"}
# Which stages run in which container, in DAG order.
STAGE_GROUPS = {"prepare": (("prepare", "model"), "cpu"), "train": (("train",), "gpu"),
                "evaluate": (("evaluate", "export"), "cpu")}


def served_deployments(cfg: PipelineConfig) -> list[RunnerDeployment]:
    """The deployments `make serve` runs in its own process (no work pool, no container)."""
    parameters = {"config": cfg.model_dump(mode="json")}
    found = [pipeline.to_deployment(
        name="scheduled-retraining", cron=cfg.orchestration.schedule_cron, parameters=parameters,
        tags=["grpoflow"], description=f"the whole pipeline at '{cfg.orchestration.schedule_cron}'")]
    if cfg.continuous.heldout is not None:
        found.append(continuous.to_deployment(
            name="continuous-finetune", interval=cfg.continuous.poll_seconds, parameters=parameters,
            concurrency_limit=1, tags=["grpoflow"],
            description=f"looks at {cfg.continuous.drop_dir} every {cfg.continuous.poll_seconds} s"))
    return found


def job_variables(kind: str, *, artifacts: Path, cache: Path, images: dict[str, str] = IMAGES) -> dict[str, Any]:
    """A docker work pool's job variables for a stage container.

    The images' entrypoint is the grpoflow CLI; a Prefect worker starts a flow run with its own
    command (`prefect flow-run execute`), so the entrypoint is replaced by /usr/bin/env for it."""
    variables: dict[str, Any] = {
        "image": images[kind],
        "volumes": [f"{Path(artifacts).resolve()}:{IMAGE_WORKDIR}/artifacts", f"{Path(cache).resolve()}:{IMAGE_WORKDIR}/cache"],
        "env": {"GRPOFLOW_CACHE_DIR": f"{IMAGE_WORKDIR}/cache"},
        "auto_remove": True,
        # the images are built on the worker's host (make images), not pushed: with a :latest tag and no
        # policy, prefect-docker would pull them first and fail
        "image_pull_policy": "IfNotPresent",
        "container_create_kwargs": {"entrypoint": ["/usr/bin/env"], "working_dir": IMAGE_WORKDIR},
    }
    if kind == "gpu":  # docker run --gpus all --ipc=host
        variables["container_create_kwargs"].update(
            device_requests=[{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}], ipc_mode="host")
    return variables


def stage_deployments(cfg: PipelineConfig, *, artifacts: Path, cache: Path, images: dict[str, str] = IMAGES,
                      gpu: bool = True) -> list[tuple[RunnerDeployment, str]]:
    """(deployment, image) per stage group: the pipeline flow limited to those stages. Without `gpu`,
    train runs in the CPU image too, with no device requested (a host without GPUs)."""
    found = []
    for name, (stages, kind) in STAGE_GROUPS.items():
        kind = kind if gpu else "cpu"
        config = cfg.model_dump(mode="json")
        config["orchestration"]["stages"] = list(stages)
        deployment = pipeline.to_deployment(
            name=f"stage-{name}", parameters={"config": config}, tags=["grpoflow", f"image:{kind}"],
            job_variables=job_variables(kind, artifacts=artifacts, cache=cache, images=images),
            description=f"{', '.join(stages)} in {images[kind]}")
        deployment.entrypoint = "flows/pipeline.py:pipeline"  # relative to IMAGE_WORKDIR in the image
        found.append((deployment, images[kind]))
    return found


@flow(name="grpoflow-staged", flow_run_name="stages in containers")
def staged(config: dict[str, Any] | None = None) -> dict[str, str]:
    """Each stage group as a run of its container deployment, in DAG order; stop at the first that fails."""
    cfg = validate_config(config or {}, "the flow's config parameter")
    logger = get_run_logger()
    states = {}
    for name, (stages, _) in STAGE_GROUPS.items():
        stage_config = cfg.model_dump(mode="json")
        stage_config["orchestration"]["stages"] = list(stages)
        run = run_deployment(f"grpoflow-pipeline/stage-{name}", parameters={"config": stage_config})
        states[name] = run.state.name
        logger.info("%s: %s (%s)", name, run.state.name, run.name)
        if not run.state.is_completed():
            raise RuntimeError(f"stage-{name} ended {run.state.name}; see flow run {run.name} ({run.id})")
    return states


def apply_docker(cfg: PipelineConfig, work_pool: str, *, artifacts: Path, cache: Path,
                 images: dict[str, str] = IMAGES, gpu: bool = True) -> list[str]:
    """Register the stage deployments and the staged flow on a docker work pool (created when missing)."""
    _ensure_docker_pool(work_pool)
    ids = [str(d.apply(work_pool_name=work_pool, image=image))
           for d, image in stage_deployments(cfg, artifacts=artifacts, cache=cache, images=images, gpu=gpu)]
    parent = staged.to_deployment(name="containers", cron=cfg.orchestration.schedule_cron,
                                  parameters={"config": cfg.model_dump(mode="json")}, tags=["grpoflow"],
                                  job_variables=job_variables("cpu", artifacts=artifacts, cache=cache, images=images))
    parent.entrypoint = "flows/deploy.py:staged"
    ids.append(str(parent.apply(work_pool_name=work_pool, image=images["cpu"])))
    _run_in_image_workdir(ids)
    return ids


def _run_in_image_workdir(deployment_ids: list[str]) -> None:
    """`prefect flow-run execute` runs a flow in a temporary folder of its own, into which it copies the
    deployment's code folder when there is no pull step: in a container that copies the mounted
    artifacts too, and the stages' relative paths land in the copy, which is lost with the container.
    A pull step that moves into the image's working directory instead keeps every path on the volumes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    steps = [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}]
    with get_client(sync_client=True) as client:
        for deployment_id in deployment_ids:
            client.update_deployment(deployment_id, DeploymentUpdate(pull_steps=steps))


def _ensure_docker_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        from prefect_docker.worker import DockerWorker
    except ImportError:
        raise ConfigError("the docker work pool needs prefect-docker: pip install -e '.[docker]'") from None
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="docker",
                                                   base_job_template=DockerWorker.get_default_base_job_template()))
            return
        if pool.type != "docker":
            raise ConfigError(f"--work-pool {name}: a {pool.type!r} work pool; give a docker one (or a new name)")


def run_serve(cfg: PipelineConfig) -> None:
    """Register the served deployments and run their flow runs in this process until it is stopped."""
    deployments = served_deployments(cfg)
    watch_children()  # killed from outside, serve takes its runs with it
    if cfg.continuous.heldout is not None:
        crash_abandoned_run(Path(cfg.continuous.state_dir))  # a killed serve's run frees the slot it held
    if len(deployments) == 1:
        print("continuous.heldout is not set: serving the scheduled pipeline only", file=sys.stderr)
    serve(*deployments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve", "docker"])
    parser.add_argument("-c", "--config", type=Path, help="pipeline config YAML (default: the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    parser.add_argument("--work-pool", default="grpoflow-docker", help="docker: the work pool (created if missing)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="docker: mounted as artifacts/")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "grpoflow",
                        help="docker: the model cache, mounted in every stage container")
    parser.add_argument("--no-gpu", action="store_true",
                        help="docker: train in grpoflow-cpu on the CPU, for a host without GPUs")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.command == "docker":
            for deployment_id in apply_docker(cfg, args.work_pool, artifacts=args.artifacts, cache=args.cache,
                                            gpu=not args.no_gpu):
                print(deployment_id)
            print(f"start a worker: prefect worker start --pool {args.work_pool} --type docker", file=sys.stderr)
            return 0
        run_serve(cfg)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
