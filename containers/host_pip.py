"""Print, one per line, the podman build arguments that give a build this host's pip settings.

`pip config list` names the index, extra indexes, find-links, constraint file and CA bundle this host's
pip uses; each becomes a `--build-arg PIP_...` (the Dockerfiles declare these ARGs), and each local path
among them is bind-mounted read-only at the same place, so a file:// index or a wheel folder on this
host's disk is read inside the build as it is here. A local index is mounted from the folder above its
`simple/`, where its pages' relative links to the files lead. The CA bundle is mounted at CERT, not over
the image's own bundle, which apt rewrites during the build.
"""
import os
import subprocess
import sys

# pip option -> the ARG the Dockerfiles declare for it
KEYS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
    "constraint": "PIP_CONSTRAINT",
    "cert": "PIP_CERT",
    "default-timeout": "PIP_DEFAULT_TIMEOUT",
}
CERT = "/run/host-pip/ca-certificates.crt"


def local_path(value: str) -> str | None:
    path = value[len("file://"):] if value.startswith("file://") else value
    if not (path.startswith("/") and os.path.exists(path)):
        return None
    path = path.rstrip("/")
    return os.path.dirname(path) if os.path.basename(path) == "simple" else path


def main() -> None:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                             capture_output=True, text=True).stdout
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        option = name.rsplit(".", 1)[-1]
        if option in KEYS:
            settings[KEYS[option]] = value.strip().strip("'\"")  # :env: entries come after global ones
    mounts = set()
    cert = settings.pop("PIP_CERT", None)
    if cert:
        print(f"--build-arg=PIP_CERT={CERT}")
        print(f"--volume={cert}:{CERT}:ro")
    for arg, value in settings.items():
        print(f"--build-arg={arg}={value}")
        for part in value.split():
            path = local_path(part)
            if path:
                mounts.add(path)
    for path in sorted(mounts):
        print(f"--volume={path}:{path}:ro")


if __name__ == "__main__":
    main()
