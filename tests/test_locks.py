"""The locks (requirements/*.txt): complete, hashed, consistent with pyproject.toml, and what is installed.

An upstream release once broke a fresh `make test` while CI stayed green on a venv made before it:
setup now installs only from these files, and rebuilds the venv whenever they change.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "requirements"))
from pins import differences, normalise, read_names, read_pins, to_stage  # noqa: E402

LOCKS = {name: ROOT / "requirements" / f"{name}.txt" for name in ("cpu", "gpu", "data", "converter")}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(*extras: str) -> list[Requirement]:
    found = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return found


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_carries_its_hashes(name):
    text = LOCKS[name].read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # one entry a package, after the header
    pinned = [e for e in entries if "==" in e.split("\n")[0]]
    assert len(pinned) == len(read_pins(LOCKS[name])) > 0
    unhashed = [e.split()[0] for e in pinned if "--hash=sha256:" not in e]
    assert not unhashed, f"{name}.txt: no hash for {unhashed}"


@pytest.mark.parametrize("lock,extras,python", [("cpu", ("dev", "export", "docker"), "3.11"),
                                                ("gpu", ("gpu", "dev"), "3.12")])
def test_the_lock_holds_every_requirement_at_an_allowed_version(lock, extras, python):
    pins = read_pins(LOCKS[lock])
    environment = {"python_version": python, "platform_system": "Linux", "sys_platform": "linux",
                   "platform_machine": "x86_64"}
    for requirement in requirements(*extras):
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = normalise(requirement.name)
        assert name in pins, f"{lock}.txt does not pin {requirement} (pyproject.toml): run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{lock}.txt pins {name}=={pins[name]}, outside {requirement} (pyproject.toml): run `make lock`"


def test_the_cpu_lock_takes_the_cpu_build_of_torch_and_the_gpu_lock_the_machines():
    assert read_pins(LOCKS["cpu"])["torch"] == "2.13.0+cpu"
    assert read_pins(LOCKS["gpu"])["torch"] == "2.11.0"  # vLLM 0.26.0's pin, and the GPU machine's image
    assert read_pins(LOCKS["gpu"])["vllm"] == "0.26.0"
    assert not any(n.startswith("nvidia-") for n in read_pins(LOCKS["cpu"]))


@pytest.mark.skipif(os.environ.get("GRPOFLOW_UNLOCKED") == "1",
                    reason="make test-latest runs on the newest allowed releases, not the lock")
def test_the_installed_packages_are_the_locked_ones():
    """What `make setup` installed is exactly the lock, for every package the lock names. Read from the
    venv's site-packages, not all of sys.path: importing setuptools (torch's inductor does, for a
    CPU compile) puts setuptools' vendored packaging on sys.path, and the run saw its older version."""
    pins = {**read_pins(LOCKS["cpu"]), **read_pins(LOCKS["data"])}
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    wrong = [f"{name}: lock {version}, installed {installed.get(name, 'nothing')}"
             for name, version in sorted(pins.items()) if installed.get(name) != version]
    assert not wrong, "the venv is not the lock's (rebuild it: rm -rf .venv && make setup):\n" + "\n".join(wrong)


def test_differences_name_each_package_once():
    lock = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "peft": "0.21.2"}
    here = {"torch": "2.13.0+cpu", "transformers": "5.26.0", "kernels": "0.20.0"}
    assert differences(lock, here) == ["kernels: lock -, here 0.20.0", "peft: lock 0.21.2, here -",
                                       "transformers: lock 5.25.0, here 5.26.0"]


def test_read_pins_normalises_names_and_refuses_two_versions(tmp_path):
    lock = tmp_path / "l.txt"
    lock.write_text("Pydantic_Core==2.50.5 \\\n    --hash=sha256:ab\n    # via pydantic\nfoo[bar]==1.0 ; python_version >= '3'\n")
    assert read_pins(lock) == {"pydantic-core": "2.50.5", "foo": "1.0"}
    lock.write_text("a==1\nA==2\n")
    with pytest.raises(ValueError, match="a pinned twice"):
        read_pins(lock)


def test_the_gpu_machine_is_staged_at_the_locks_versions():
    """benchmarks/stage_gpu.sh carries every GPU-lock package the machine's image lacks, at the lock's
    version, and none of the image's CUDA stack."""
    pins = read_pins(LOCKS["gpu"])
    image = read_names(ROOT / "requirements" / "gpu-image.txt")
    staged = dict(line.split("==") for line in to_stage(pins, image))
    assert staged and all(pins[name] == version for name, version in staged.items())
    assert {"vllm", "pydantic", "datasets", "bitsandbytes", "prefect"} <= set(staged)
    assert not {"torch", "triton", "transformers", "peft"} & set(staged)
    assert not [n for n in staged if n.startswith(("nvidia-", "cuda-"))]
    assert set(pins) - set(staged) <= {normalise(n) for n in image} | {n for n in pins if n.startswith(
        ("torch", "triton", "nvidia-", "cuda-"))}
    assert "python3 requirements/pins.py stage requirements/gpu.txt requirements/gpu-image.txt" in \
        (ROOT / "benchmarks" / "stage_gpu.sh").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_changed_lock_rebuilds_the_venv(tmp_path):
    """The venv is made for one content of the locks: a changed lock makes `make setup` start over
    (rm -rf the venv), even when the venv is newer than the file."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    venv = tmp_path / "venv"

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", *args, f"VENV={venv}"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    plan = make("-n", "setup")
    assert plan.returncode == 0 and f"rm -rf {venv}" in plan.stdout, plan.stdout + plan.stderr
    stamp = next(line.split()[-1] for line in plan.stdout.splitlines() if line.startswith("touch "))
    venv.mkdir()
    Path(stamp).touch()
    assert make("-q", "setup").returncode == 0  # up to date: nothing to do
    with (tmp_path / "requirements" / "cpu.txt").open("a") as f:
        f.write("\n# a new pin\n")
    Path(stamp).touch()  # newer than the changed lock: only its content tells
    assert make("-q", "setup").returncode != 0
    assert f"rm -rf {venv}" in make("-n", "setup").stdout
