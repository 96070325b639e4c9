# The GPU training image: vLLM 0.26 (which brings torch 2.11 and its CUDA libraries), bitsandbytes,
# this project. The host needs an NVIDIA driver and the NVIDIA Container Toolkit.
#   docker build -f containers/gpu.Dockerfile -t grpoflow-gpu .
#   docker run --rm --gpus all --ipc=host -v $PWD/artifacts:/opt/grpoflow/artifacts grpoflow-gpu \
#       train -c configs/gsm8k-gpu.yaml
# BASE is a Python 3.12 image (the GPU lock is for 3.12; bookworm's own Python is 3.11).
ARG BASE=docker.io/library/python:3.12-slim-bookworm
FROM ${BASE}
# The package index settings (containers/host_pip.py passes the host's); empty means pip's defaults.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT

ENV DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PIP_NO_CACHE_DIR=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    GRPOFLOW_CACHE_DIR=/opt/grpoflow/cache

# bubblewrap for the code sandbox (containers/README.md: it needs namespaces, which Docker's default
# seccomp profile refuses); a C compiler for the lock's one C sdist, pycosat (no wheel on PyPI), and for
# Triton, which compiles its launchers at run time (the Python headers come with the base)
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap gcc libc6-dev \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/grpoflow
# Every package from the committed GPU lock (Python 3.12: vLLM 0.26.0 and the torch 2.11.0 it pins),
# hashes checked; the data packages from theirs.
COPY requirements requirements
RUN pip install --require-hashes --no-deps -r requirements/gpu.txt \
    && pip install --require-hashes --no-deps -r requirements/data.txt
COPY pyproject.toml README.md ./
COPY grpoflow grpoflow
COPY stages stages
COPY flows flows
COPY kernels kernels
COPY configs configs
COPY benchmarks benchmarks
RUN pip install --no-deps --no-build-isolation '.[gpu]'

ENTRYPOINT ["grpoflow"]
CMD ["train", "-c", "configs/gsm8k-gpu.yaml"]
