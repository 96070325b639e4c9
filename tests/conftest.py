"""Shared fixtures. Tests run the real parts: pyarrow files, Prefect, transformers, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

# Before prefect or huggingface_hub are imported anywhere: offline, no telemetry.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# as flows/__init__.py sets it for every entry point: Prefect reads it when it is first imported, which
# in a test session can come before flows/ is (test_flow.py reads the grpoflow lines from the task logs)
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "grpoflow")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

try:
    import torch
except ImportError:  # the CPU tests below never need it; the GPU marker does
    torch = None

# Without a GPU the Triton kernels (kernels/triton_*.py) run under Triton's interpreter, on the
# CPU. Read when a kernel is defined, so this must come before kernels/ is imported.
if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch is not None and torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:  # the marker, not a parameter id that says "gpu"
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _allocator_settings_restored():
    """A training run in async mode sets PYTORCH_CUDA_ALLOC_CONF for its process (grpo.expandable_segments,
    stages/train.py): the tests after it start from the session's value, as a new process would."""
    before = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    yield
    if before is None:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = before


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite in a temp dir) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A cache dir shared by the tests that convert SmolLM2, so it is converted once a session."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def smollm2(model_cache) -> Path:
    from grpoflow.base_model import resolve_model
    from grpoflow.config import ModelConfig

    return Path(resolve_model(ModelConfig(cache_dir=model_cache)).path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer and chat template:
    the whole generate/score path in seconds. Its answers are noise; behaviour tests use SmolLM2."""
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpoflow.base_model import PACKAGED_MODELS

    packaged = PACKAGED_MODELS["smollm2-135m-instruct"]
    gguf_dir = importlib.util.find_spec(packaged.package).submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=packaged.gguf_file)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prefect_ui_server(tmp_path_factory):
    """`prefect server start` on a free port, with its services (the scheduler) and the UI; its
    own database. Yields the API URL. Tests point at it with prefect.settings.temporary_settings."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.processes import end

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-server")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"prefect server start did not come up on port {port}; see {home / 'server.log'}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        end(server, timeout=20)
        log.close()


@pytest.fixture(scope="module")
def unsandboxed_allowed():
    """For the tests of the layers inside the sandboxed interpreter (test_code_verifier*.py): on a
    machine with no OS isolation (no bubblewrap, not root) they run without it, as the config's
    verifier.allow_unsandboxed: true would. test_code_sandbox.py tests what the OS adds, and skips
    there, saying why."""
    from grpoflow.verifiers import allow_unsandboxed

    allow_unsandboxed(True)
    yield
    allow_unsandboxed(False)
