"""Shared fixtures. Tests run the real parts: pyarrow files, Prefect, transformers, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

# Before prefect or huggingface_hub are imported anywhere: offline, no telemetry.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

try:
    import torch
except ImportError:  # the CPU tests below never need it; the GPU marker does
    torch = None


def pytest_collection_modifyitems(config, items):
    has_cuda = torch is not None and torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


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
    from grpoflow.config import ModelConfig
    from grpoflow.models import resolve_model

    return Path(resolve_model(ModelConfig(cache_dir=model_cache)).path)
