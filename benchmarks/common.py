"""What several benchmarks share: the Qwen3-0.6B shape, package versions for the record, freeing memory and
disk."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

# Qwen3-0.6B: 28 layers, hidden 1024, MLP 3072, 16 query / 8 key-value heads of 128, vocabulary
# 151,936, tied embeddings (random weights stand in for it: speed and memory of the shape)
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=True)


def log_grpoflow() -> None:
    """grpoflow's own log lines (INFO: the engine's sizing, shared weights, each step) on stderr, one
    plain line each, as the CLI writes them to a file; other libraries keep their own levels."""
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("grpoflow").setLevel(logging.INFO)


def versions(*packages: str) -> dict[str, str | None]:
    """Python, torch and the given packages' installed versions (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def drop_saved_models(output_dir: str | Path) -> None:
    """A measuring run's saved model and last checkpoint (final/, checkpoints/) removed once its metrics
    are read: a 0.6B's, with its optimizer state, is GBs, and one mode's runs filled a 64 GB disk."""
    for saved in ("checkpoints", "final"):
        shutil.rmtree(Path(output_dir) / saved, ignore_errors=True)


def free_memory() -> None:
    """Drop what the last case left, so the next one's peak starts from the inputs."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_or_exit(smoke: bool, needs_gpu: str) -> torch.device:
    """CUDA when there is a GPU; else the CPU for a --smoke run, with the Triton kernels
    interpreted (set before kernels/triton_*.py are imported); else exit saying why (needs_gpu)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        sys.exit(f"no CUDA device: {needs_gpu}")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cpu")
