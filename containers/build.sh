#!/usr/bin/env bash
# Builds the images (`make images`; GPU=1 adds grpoflow-gpu) with podman or docker, whichever this
# machine has. containers/README.md says what each step costs here.
#   containers/build.sh cpu [gpu]     the images
#   containers/build.sh gpu-base      only grpoflow-gpu's base, pulled or made (tests/test_container_run.py)
# Environment: ENGINE (podman or docker; default: podman if installed, else a docker with a reachable
# daemon), BASE (the Debian bookworm image grpoflow-cpu builds on; default: docker.io/library/debian:bookworm
# if it can be pulled, else a local one made with debootstrap), GPU_BASE (the Python 3.12 image
# grpoflow-gpu builds on; default: docker.io/library/python:3.12-slim-bookworm if it can be pulled, else
# localhost/python:3.12-bookworm, made from BASE and PYTHON312), PYTHON312 (a CPython 3.12 installed in a
# prefix of its own, for that local base; default: the newest pyenv 3.12), PYTHON (the host Python whose
# pip settings and pip wheel cache the build reuses).
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -gt 0 ] || { echo "usage: containers/build.sh cpu [gpu] | gpu-base" >&2; exit 2; }
for image in "$@"; do
    case $image in cpu|gpu|gpu-base) ;; *) echo "containers/build.sh: no image '$image' (cpu, gpu or gpu-base)" >&2; exit 2 ;; esac
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
# apt and pip in a build reach the host's mirror and indexes through the host's network
network=()
if [ "$ENGINE" = podman ]; then network=(--network host); fi

here() { $ENGINE image inspect "$1" >/dev/null 2>&1; }
here_or_pulled() { here "$1" || timeout 30 $ENGINE pull -q "$1" >/dev/null 2>&1; }

# The Debian bookworm base. Where no registry answers, one is made from this machine's apt mirror with
# debootstrap and kept as an OCI archive, loaded again on the next build.
debian_base() {
    [ -z "${BASE:-}" ] || return 0
    BASE=docker.io/library/debian:bookworm
    here_or_pulled "$BASE" && return 0
    BASE=localhost/debian:bookworm
    local archive=$CACHE/debian-bookworm.oci.tar
    here "$BASE" && return 0
    if [ -f "$archive" ]; then
        $ENGINE load -q -i "$archive" >/dev/null
        return 0
    fi
    [ "$ENGINE" = podman ] || { echo "no base image reachable: set BASE to a Debian bookworm image" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "no base image reachable and no debootstrap: make containers-setup" >&2; exit 1; }
    local mirror
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
}

# grpoflow-gpu's base carries Python 3.12 (the GPU lock is for 3.12), which no Debian bookworm package
# has: python:3.12-slim-bookworm where it can be pulled. Where no registry answers, a local one, made
# once (containers/python-base.Dockerfile) from the Debian base and a CPython 3.12 built on this host,
# and kept as an OCI archive like the Debian base.
gpu_base() {
    if [ -n "${GPU_BASE:-}" ]; then
        here_or_pulled "$GPU_BASE" && return 0
        echo "grpoflow-gpu: its base GPU_BASE=$GPU_BASE cannot be pulled; set GPU_BASE to a Python 3.12 image this engine has" >&2
        exit 1
    fi
    local public=docker.io/library/python:3.12-slim-bookworm
    GPU_BASE=$public
    here_or_pulled "$GPU_BASE" && { echo "grpoflow-gpu: building on $GPU_BASE"; return 0; }
    GPU_BASE=localhost/python:3.12-bookworm
    local archive=$CACHE/python-3.12-bookworm.oci.tar
    if here "$GPU_BASE"; then
        echo "grpoflow-gpu: $public cannot be pulled; building on the local $GPU_BASE"
        return 0
    fi
    if [ -f "$archive" ]; then
        $ENGINE load -q -i "$archive" >/dev/null
        echo "grpoflow-gpu: $public cannot be pulled; building on the local $GPU_BASE (loaded from $archive)"
        return 0
    fi
    local python=${PYTHON312:-}
    if [ -z "$python" ]; then
        python=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -1 || true)
    fi
    if [ -z "$python" ]; then
        echo "grpoflow-gpu: its base $public cannot be pulled and there is no Python 3.12 here to make one from:" \
             "set GPU_BASE to a Python 3.12 image this engine has, or PYTHON312 to a CPython 3.12 installed in a" \
             "prefix of its own (pyenv install 3.12)" >&2
        exit 1
    fi
    local found version prefix
    found=$("$python" -c 'import platform, sys; print(platform.python_version(), sys.base_prefix)' 2>/dev/null) || true
    version=${found%% *}; prefix=${found#* }
    if [[ "${version:-}" != 3.12.* ]]; then
        echo "grpoflow-gpu: PYTHON312=$python is not a Python 3.12 (${version:-it does not run})" >&2
        exit 1
    fi
    case $prefix in
        /|/usr)
            echo "grpoflow-gpu: PYTHON312=$python lives in the system's prefix $prefix, which cannot be copied into" \
                 "an image; use a CPython 3.12 installed in a prefix of its own (pyenv install 3.12)" >&2
            exit 1 ;;
    esac
    command -v dpkg >/dev/null || { echo "grpoflow-gpu: making a local Python base needs a Debian host (dpkg)" >&2; exit 1; }
    debian_base
    # The Debian packages of the libraries it links against; the test suite and Tk are left out (the image
    # has no display), and the static libpython, as in python:3.12-slim-bookworm.
    local libs lib package packages=""
    libs=$(find "$prefix" \( -name '*.so*' -o -path "$prefix/bin/python3.12" \) -type f \
               -not -path "$prefix/lib/python3.12/test/*" -not -name '_tkinter.*' -exec ldd {} + 2>/dev/null \
           | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | grep -v "^$prefix/" | sort -u)
    for lib in $libs; do
        package=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "/usr$lib" 2>/dev/null) \
            || { echo "grpoflow-gpu: no Debian package of this host has $lib, which $python links against" >&2; exit 1; }
        packages+="${package%%:*}"$'\n'
    done
    packages=$(sort -u <<<"$packages" | xargs)
    context=$(mktemp -d "$CACHE/python-base.XXXXXX")
    trap 'rm -rf "$context"' EXIT
    echo "grpoflow-gpu: $public cannot be pulled: making $GPU_BASE from $BASE and Python $version at $prefix" \
         "(moved to /usr/local; Debian libraries: $packages)"
    tar -C "$prefix" --exclude=./lib/python3.12/test --exclude=./lib/python3.12/tkinter \
        --exclude=./lib/python3.12/idlelib --exclude=./lib/python3.12/turtledemo \
        --exclude='./lib/python3.12/lib-dynload/_tkinter.*' --exclude='./bin/idle*' --exclude='*.a' \
        -cf "$context/python.tar" .
    $ENGINE build "${network[@]}" --build-arg "BASE=$BASE" --build-arg "PACKAGES=$packages" \
        --build-arg "OLD_PREFIX=$prefix" -f containers/python-base.Dockerfile -t "$GPU_BASE" "$context"
    rm -rf "$context"; trap - EXIT
    if [ "$ENGINE" = podman ]; then
        podman save -q --format oci-archive -o "$archive.part" "$GPU_BASE" && mv "$archive.part" "$archive"
    fi
}

if [[ " $* " == *" cpu "* ]]; then debian_base; fi
if [[ " $* " == *" gpu "* || " $* " == *" gpu-base "* ]]; then gpu_base; fi

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
    args+=("${network[@]}" "${pip_args[@]}")
fi
torch_links=$(ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1 && echo /opt/wheels || true)
for image in "$@"; do
    if [ "$image" = cpu ]; then
        extra=(--build-arg "BASE=$BASE")
        [ -n "$torch_links" ] && extra+=(--build-arg "TORCH_FIND_LINKS=$torch_links")
    elif [ "$image" = gpu ]; then
        extra=(--build-arg "BASE=$GPU_BASE")
    else
        echo "grpoflow-gpu's base: $GPU_BASE"
        continue
    fi
    start=$(date +%s)
    $ENGINE build "${args[@]}" "${extra[@]}" -f "containers/$image.Dockerfile" -t "grpoflow-$image" .
    echo "grpoflow-$image built in $(( $(date +%s) - start )) s with $ENGINE: $($ENGINE image inspect --format '{{.Size}}' "grpoflow-$image") bytes"
done
