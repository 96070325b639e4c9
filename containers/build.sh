#!/usr/bin/env bash
# Builds the images (`make images`; GPU=1 adds grpoflow-gpu) with podman or docker, whichever this
# machine has. containers/README.md says what each step costs here.
#   containers/build.sh cpu [gpu]
# Environment: ENGINE (podman or docker; default: podman if installed, else a docker with a reachable
# daemon), BASE (the Debian bookworm image grpoflow-cpu builds on; default: docker.io/library/debian:bookworm
# if it can be pulled, else a local one made with debootstrap), GPU_BASE (the Python 3.12 image
# grpoflow-gpu builds on; default: docker.io/library/python:3.12-slim-bookworm), PYTHON (the host Python whose pip settings
# and pip wheel cache the build reuses).
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -gt 0 ] || { echo "usage: containers/build.sh cpu [gpu]" >&2; exit 2; }
for image in "$@"; do
    case $image in cpu|gpu) ;; *) echo "containers/build.sh: no image '$image' (cpu or gpu)" >&2; exit 2 ;; esac
done
PYTHON=${PYTHON:-python3}
CACHE=.cache/containers
mkdir -p "$CACHE"

if [ -z "${ENGINE:-}" ]; then
    if command -v podman >/dev/null; then ENGINE=podman
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    else
        echo "no container engine: install podman (make containers-setup) or docker with a running daemon" >&2
        exit 1
    fi
fi

if [ "$ENGINE" = podman ]; then
    # This machine's settings, which other hosts accept too: runc (crun refuses a mixed cgroup v1/v2
    # layout), cgroupfs (no systemd session), and container ulimits no higher than this shell's hard
    # limits (root without CAP_SYS_RESOURCE cannot raise them; 32768 is enough for any stage).
    cap() { local n; n=$(ulimit "$1"); [ "$n" = unlimited ] || [ "$n" -gt 32768 ] && n=32768; echo "$n"; }
    nofile=$(cap -Hn); nproc=$(cap -Hu)
    cat > "$CACHE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF=$PWD/$CACHE/containers.conf
fi

# grpoflow-gpu needs Python 3.12, which no Debian bookworm package has: its base must be reachable.
if [[ " $* " == *" gpu "* ]]; then
    GPU_BASE=${GPU_BASE:-docker.io/library/python:3.12-slim-bookworm}
    if ! $ENGINE image exists "$GPU_BASE" 2>/dev/null && ! timeout 30 $ENGINE pull -q "$GPU_BASE" >/dev/null 2>&1; then
        echo "grpoflow-gpu: its base $GPU_BASE cannot be pulled; set GPU_BASE to a Python 3.12 image this engine has" >&2
        exit 1
    fi
fi

# The base: a Debian bookworm image. Where no registry answers, one is made from this machine's apt
# mirror with debootstrap and kept as an OCI archive, loaded again on the next build.
if [ -z "${BASE:-}" ]; then
    BASE=docker.io/library/debian:bookworm
    if ! $ENGINE image exists "$BASE" 2>/dev/null && ! timeout 30 $ENGINE pull -q "$BASE" >/dev/null 2>&1; then
        BASE=localhost/debian:bookworm
        archive=$CACHE/debian-bookworm.oci.tar
        if ! $ENGINE image exists "$BASE" 2>/dev/null; then
            if [ -f "$archive" ]; then
                $ENGINE load -q -i "$archive" >/dev/null
            else
                [ "$ENGINE" = podman ] || { echo "no base image reachable: set BASE to a Debian bookworm image" >&2; exit 1; }
                command -v debootstrap >/dev/null || { echo "no base image reachable and no debootstrap: make containers-setup" >&2; exit 1; }
                mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
                mirror=${mirror:-http://deb.debian.org/debian}
                rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
                trap 'rm -rf "$rootfs"' EXIT
                echo "no base image reachable: making $BASE with debootstrap from $mirror"
                debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
                    || { echo "debootstrap failed: $CACHE/debootstrap.log" >&2; exit 1; }
                tar -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
                rm -rf "$rootfs"; trap - EXIT
                podman save -q --format oci-archive -o "$archive.part" "$BASE" && mv "$archive.part" "$archive"
            fi
        fi
    fi
fi

# llama-cpp-python has no wheel on PyPI and compiles for 6-9 minutes: the wheel this host's pip already
# built (make setup keeps it in pip's cache) goes into a wheelhouse the CPU build mounts; `pip wheel`
# takes it from the cache, or builds it once where the cache lacks it.
llama=$(awk -F'==' '/^llama-cpp-python==/ {print $2; exit}' requirements/cpu.txt | tr -d ' \\')
wheelhouse=$CACHE/wheelhouse
mkdir -p "$wheelhouse"
if [[ " $* " == *" cpu "* ]] && ! ls "$wheelhouse"/llama_cpp_python-"$llama"-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheelhouse" "llama-cpp-python==$llama"
fi

args=()
if [ "$ENGINE" = podman ]; then
    mapfile -t pip_args < <("$PYTHON" containers/host_pip.py)
    args+=(--network host "${pip_args[@]}")
fi
torch_links=$(ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1 && echo /opt/wheels || true)
for image in "$@"; do
    if [ "$image" = cpu ]; then
        extra=(--build-arg "BASE=$BASE")
        [ -n "$torch_links" ] && extra+=(--build-arg "TORCH_FIND_LINKS=$torch_links")
    else
        extra=(--build-arg "BASE=$GPU_BASE")
    fi
    start=$(date +%s)
    $ENGINE build "${args[@]}" "${extra[@]}" -f "containers/$image.Dockerfile" -t "grpoflow-$image" .
    echo "grpoflow-$image built in $(( $(date +%s) - start )) s with $ENGINE: $($ENGINE image inspect --format '{{.Size}}' "grpoflow-$image") bytes"
done
