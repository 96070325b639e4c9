"""Checkpoints: written atomically (temp folder, then rename), the newest K kept, resumable exactly.

A checkpoint holds everything the next step depends on: trained weights, optimizer, schedule,
loss scaler, every RNG, the data position and the unconsumed rest of the current generation
(each process's, under data parallelism; rank 0 writes the checkpoint).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:06d}"


def save_checkpoint(folder: Path, step: int, policy, optimizer, scheduler, scaler, state: dict[str, Any],
                    keep: int) -> Path:
    final = checkpoint_path(folder, step)
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.model.save_pretrained(tmp / "model")  # adapters alone under LoRA: what export needs
    policy.tokenizer.save_pretrained(tmp / "model")
    torch.save({
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in policy.model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "rng": rng_state(), **state,
    }, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.pt").is_file())


def load_checkpoint(path: Path, policy, optimizer, scheduler, scaler) -> dict[str, Any]:
    saved = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, value in saved.pop("trainable").items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(saved.pop("optimizer"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    scaler.load_state_dict(saved.pop("scaler"))
    set_rng_state(saved.pop("rng"))
    return saved


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
