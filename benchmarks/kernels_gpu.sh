#!/usr/bin/env bash
# issue #7's GPU measurements, one device call each (a call runs 10 minutes at most). From the
# repository root, on a machine staged by benchmarks/stage_gpu.sh (Liger Kernel, the peer, in /tmp/site).
#   bash benchmarks/kernels_gpu.sh kernels-qwen    # (16*1024, 2048, 151936): bf16 + fp16, lm_head frozen + trained
#   bash benchmarks/kernels_gpu.sh kernels-llama   # (8*4096, 4096, 128256): the same
#   bash benchmarks/kernels_gpu.sh maxlen-naive    # longest completion that fits, Qwen3-0.6B shape, LoRA, naive
#   bash benchmarks/kernels_gpu.sh maxlen-triton   # the same, grpo.kernels: triton
#   bash benchmarks/kernels_gpu.sh smoke           # all of it at tiny sizes (a minute): does it run here?
# Extra arguments go to the Python script. Results (JSON, and a markdown table for kernels) go under $OUT.
set -euo pipefail
mode=${1:?usage: kernels_gpu.sh kernels-qwen|kernels-llama|maxlen-naive|maxlen-triton|smoke [args...]}
shift
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import liger_kernel" 2>/dev/null || echo "Liger Kernel is not installed (benchmarks/stage_gpu.sh stages it): its column stays empty"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: the CPU (smoke only)"
case $mode in
  kernels-qwen)  python3 benchmarks/kernel_speed.py --out "$OUT" --name kernels-qwen --shapes 16 1024 2048 151936 "$@" ;;
  kernels-llama) python3 benchmarks/kernel_speed.py --out "$OUT" --name kernels-llama --shapes 8 4096 4096 128256 "$@" ;;
  maxlen-naive)  python3 benchmarks/max_completion.py --out "$OUT" --kernels naive "$@" ;;
  maxlen-triton) python3 benchmarks/max_completion.py --out "$OUT" --kernels triton --start 4096 "$@" ;;
  smoke)
    python3 benchmarks/kernel_speed.py --smoke --out "$OUT" --name kernels-smoke --shapes 4 64 64 1000 "$@"
    # the kernel tests, compiled for the GPU this time (the trainer-level ones need pydantic and prefect)
    if python3 -c "import pytest" 2>/dev/null; then
      python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_kernels.py -k "not trainer and not heads"
    else
      echo "pytest is not installed here: kernel tests skipped"
    fi ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
