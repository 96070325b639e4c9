"""Hashes for caches: of a file's bytes, of a cache key's parts, and of a model folder.

Every stage and flow that skips work it has done names that work by `cache_key(...)`, and a model
in it by `model_fingerprint(...)`, so that two of them never disagree on whether a model or an
input is the same one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (GGUFs and safetensors run to gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(parts: dict[str, Any] | list[Any]) -> str:
    """sha256 of `parts` as JSON with sorted keys: the same parts give the same key in every process.

    `parts` holds JSON values only (a config as model_dump(mode="json"), hashes, fingerprints); any
    other object is a TypeError rather than its str(), which could hold a memory address. The bytes
    hashed must never change: every cache already on disk is named by them."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def model_fingerprint(path: str | Path) -> list[Any]:
    """What makes a model folder the same model, for a cache key: its resolved path and the name,
    size and modification time (ns) of every file directly in it (weights, config, tokenizer and
    chat template alike). A Hub id, or any path that is not a folder, stands for itself: [path].

    The promise: a folder whose files were written again reads as a new model. Stat only, so it
    costs nothing on multi-GB weights; a content hash would cost a full read (seconds per GB) every
    time a key is made. What it would miss is a rewrite of a file with the same size within one tick
    of the file system's clock, or one that sets the old mtime back (cp -p, rsync -t of other bytes);
    this pipeline writes model folders whole and by rename (atomic_folder), so it never does either.
    It errs the safe way otherwise: a copy or a move of the same bytes reads as a new model, and
    the work is done again. Subfolders (checkpoints) are not part of the model."""
    folder = Path(path)
    if not folder.is_dir():
        return [str(path)]
    stamps = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*") if p.is_file())
    return [str(folder.resolve()), stamps]
