"""Whether the Triton kernels of kernels/ can run on a device, and if not, why (for the caller's message).

They run on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before the
kernels are imported: the tests do, through tests/conftest.py). Nothing here imports triton
unless asked, so machines without it still import kernels/.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on `device`; else one sentence saying why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it comes with CUDA builds of torch)"
    device = torch.device(device)
    if device.type == "cuda" or interpreting():
        return None
    return (f"the tensors are on {device.type}, and Triton kernels run on CUDA devices only "
            "(or on the CPU under TRITON_INTERPRET=1, for tests)")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors: how many programs run at once. A few under the interpreter,
    which runs programs one after another (and still has to exercise every split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
