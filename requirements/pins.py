"""Read the locks (requirements/*.txt, written by `make lock`) and compare an environment with them.

    python requirements/pins.py diff requirements/cpu.txt requirements/data.txt versions.txt   # a freeze vs locks
    python requirements/pins.py stage requirements/gpu.txt requirements/gpu-image.txt   # what to carry

`make test-latest` prints the first; benchmarks/stage_gpu.sh stages the second on the GPU machine, so
what runs there is what the lock says wherever the machine's image does not already hold the package;
tests/test_locks.py checks the installed venv against the lock.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def normalise(name: str) -> str:
    """PEP 503: `Pydantic_Core` and `pydantic-core` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line (hash and comment lines skipped)."""
    pins: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        match = _PIN.match(line.strip())
        if match:
            name = normalise(match.group(1))
            if name in pins and pins[name] != match.group(2):
                raise ValueError(f"{path}:{number}: {name} pinned twice ({pins[name]} and {match.group(2)})")
            pins[name] = match.group(2)
    return pins


NEVER_LOCKED = {"grpoflow", "pip"}  # the project itself, and the installer the venv comes with


def differences(lock: dict[str, str], other: dict[str, str]) -> list[str]:
    """One line per package whose version differs, or that only one side has."""
    lines = []
    for name in sorted((set(lock) | set(other)) - NEVER_LOCKED):
        if lock.get(name) != other.get(name):
            lines.append(f"{name}: lock {lock.get(name, '-')}, here {other.get(name, '-')}")
    return lines


# never carried: the image's CUDA build of torch and the CUDA libraries it was built with
_IMAGE_BOUND = ("torch", "triton", "nvidia-", "cuda-")


def to_stage(lock: dict[str, str], image: set[str]) -> list[str]:
    """NAME==VERSION for every locked package the GPU machine's image does not hold."""
    image = {normalise(name) for name in image}
    return [f"{name}=={version}" for name, version in sorted(lock.items())
            if name not in image and not any(name == b or (b.endswith("-") and name.startswith(b)) for b in _IMAGE_BOUND)]


def read_names(path: str | Path) -> set[str]:
    """One distribution name a line; # comments and blank lines skipped."""
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "diff":
        locked = {name: version for lock in argv[1:-1] for name, version in read_pins(lock).items()}
        found = differences(locked, read_pins(argv[-1]))
        print("\n".join(found) if found else "the same versions as the lock")
        return 1 if found else 0
    if len(argv) == 3 and argv[0] == "stage":
        print("\n".join(to_stage(read_pins(argv[1]), read_names(argv[2]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
