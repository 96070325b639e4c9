"""Checkpoints: written atomically (temp folder, then rename), the newest K kept, resumable exactly.

A checkpoint holds everything the next step depends on: trained weights, optimizer, schedule,
loss scaler, every RNG, the data position and the unconsumed rest of the current generation
(each process's, under data parallelism; rank 0 writes the checkpoint).

    step-000010/model/              the trained weights, once: adapters (LoRA) or the whole model
    step-000010/trainer_state.pt    the rest
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
    older = saved.pop("trainable", None)  # checkpoints from before model/ was the only copy
    if older is not None:
        params = dict(policy.model.named_parameters())
        with torch.no_grad():
            for name, value in older.items():
                params[name].copy_(value.to(params[name].device))
    else:
        _load_trained(path, policy)
    optimizer.load_state_dict(saved.pop("optimizer"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    scaler.load_state_dict(saved.pop("scaler"))
    set_rng_state(saved.pop("rng"))
    return saved


def trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trained weights a checkpoint holds, as saved in model/ (peft's names under LoRA)."""
    from safetensors.torch import load_file

    files = sorted((path / "model").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path / 'model'}: no *.safetensors; the checkpoint is incomplete")
    weights: dict[str, torch.Tensor] = {}
    for f in files:  # one file, or the shards of a large model
        weights.update(load_file(f))
    return weights


def _load_trained(path: Path, policy) -> None:
    weights = trained_weights(path)
    if policy.is_peft:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, weights)
        unexpected = result.unexpected_keys
        missing = [n for n, p in policy.model.named_parameters() if p.requires_grad and n in result.missing_keys]
    else:
        params = dict(policy.model.named_parameters())
        missing, unexpected = policy.model.load_state_dict(weights, strict=False)
        loaded = {params[n].data_ptr() for n in weights if n in params}
        # buffers are not saved, nor a tied lm_head: it is the embedding's tensor
        missing = [n for n in missing if n in params and params[n].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"{path / 'model'} does not match the model being trained: missing {missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}; resume with the same model and model section")


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
