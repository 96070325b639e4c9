"""Continuous fine-tuning, the parts that are not training: what is new, what to promote.

    intake    drops + the fixed held-out -> data prep (content-hash keyed) -> rows no round has trained on
    gate      challenger vs champion on the held-out figure: promote unless it regresses beyond tolerance
    lineage   a promoted challenger as a whole model the next round starts from (LoRA merged in float32)

The flow (flows/continuous.py) strings these around the train, evaluate and export stages and
keeps the rounds in grpoflow/rounds.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grpoflow.atomic import atomic_folder
from grpoflow.batching import BatchPlan
from grpoflow.config import ConfigError, PipelineConfig
from grpoflow.data_files import FILE_SUFFIXES
from grpoflow.rounds import Rounds
from stages.drops import DropScan, scan_drops
from stages.prepare import Manifest, run_prepare

log = logging.getLogger("grpoflow.continuous")



@dataclass
class Intake:
    manifest: Manifest | None  # data prep over every drop so far, with the held-out set (None: no drop yet)
    drops: list[str]  # drop files seen, by name
    new_rows: pa.Table  # prepared train rows no round has trained on, at most one round's worth
    row_id: str  # hash of the new rows' ids: the round they would make
    waiting_rows: int  # all the prepared rows no round has trained on (new_rows: the first of them)
    scan: DropScan  # what was done with each file in the drop folder

    @property
    def heldout_path(self) -> Path:
        return self.manifest.heldout_path


def check(cfg: PipelineConfig) -> None:
    """Say what is missing before anything runs."""
    cc = cfg.continuous
    if cc.heldout is None:
        raise ConfigError("continuous.heldout: not set; give the file of held-out questions (in the drops' columns) "
                          "that every challenger and the champion are evaluated on")
    if not Path(cc.heldout).is_file():
        raise ConfigError(f"continuous.heldout: {cc.heldout} does not exist")
    if Path(cc.heldout).suffix not in FILE_SUFFIXES:
        raise ConfigError(f"continuous.heldout: {cc.heldout} is not one of {', '.join(FILE_SUFFIXES)}")
    if cfg.grpo.max_steps is None:
        raise ConfigError("grpo.max_steps: null, but the continuous flow needs it: a round trains that many steps on "
                          "as many new rows as they reach (num_train_epochs alone would depend on how many arrived)")
    if not Path(cc.drop_dir).is_dir():
        raise ConfigError(f"continuous.drop_dir: {cc.drop_dir} is not a folder; create it, then drop data files "
                          f"({', '.join(FILE_SUFFIXES)}) in")


def stage_config(cfg: PipelineConfig) -> PipelineConfig:
    """The pipeline config with every stage's output under continuous.state_dir."""
    state = Path(cfg.continuous.state_dir)
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"output_dir": state / "data"}),
        "grpo": cfg.grpo.model_copy(update={"output_dir": state / "train"}),
        "eval": cfg.eval.model_copy(update={"output_dir": state / "eval"}),
        "export": cfg.export.model_copy(update={"output_dir": state / "export"}),
    })


def intake(cfg: PipelineConfig, rounds: Rounds) -> Intake:
    """Prepare every ready drop with the held-out set as one source; keep the rows no round has, at
    most as many as one round's steps reach (round_capacity), in data prep's order: the rest wait.

    Data prep dedupes (a drop repeating an earlier one adds nothing), drops train rows that are
    held-out questions, and is keyed by the content of every file: unchanged drops, no work."""
    check(cfg)
    cc = cfg.continuous
    scan = scan_drops(cfg)
    pool = _sync_pool(scan.ready, Path(cc.heldout), Path(cc.state_dir) / "pool")
    if not scan.ready:
        log.info("no drop ready in %s", cc.drop_dir)
        return Intake(None, [], pa.table({"id": pa.array([], pa.string())}), "", 0, scan)
    data = cfg.data.model_copy(update={"source": str(pool), "train_split": "train", "heldout_split": "test",
                                       "max_train_rows": None, "output_dir": Path(cc.state_dir) / "data"})
    manifest = run_prepare(data)
    table = pq.read_table(manifest.train_path)
    consumed = rounds.consumed_ids()
    new = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(consumed), pa.string()))))
    waiting = new.num_rows
    new = new.slice(0, round_capacity(cfg))
    ids = sorted(new.column("id").to_pylist())
    drops = sorted(p.name.removeprefix("train-") for p in pool.iterdir() if p.name.startswith("train-"))
    log.info("%d drop(s): %d prepared rows, %d trained on or in a round, %d new (a round takes %d)", len(drops),
             table.num_rows, table.num_rows - waiting, waiting, new.num_rows)
    return Intake(manifest, drops, new, hashlib.sha256("\n".join(ids).encode()).hexdigest(), waiting, scan)


def round_capacity(cfg: PipelineConfig) -> int:
    """The prompts a round's grpo.max_steps draw: whole generations of unique_prompts each."""
    grpo = cfg.grpo
    plan = BatchPlan.from_config(grpo, num_processes=cfg.orchestration.train_processes)
    generations = -(-grpo.max_steps * grpo.gradient_accumulation_steps // plan.micro_steps_per_generation)
    return generations * plan.unique_prompts


def _sync_pool(drops: list[Path], heldout: Path, pool: Path) -> Path:
    """A folder data prep reads as one source: train-<drop> links to every ready drop, test<suffix> to the
    held-out.

    Its path never changes, so the held-out rows keep their origin and the prepared held-out file
    its bytes: the champion's figures, keyed by those bytes, are computed once."""
    pool.mkdir(parents=True, exist_ok=True)
    wanted = {f"train-{p.name}": p.resolve() for p in drops}
    wanted[f"test{heldout.suffix}"] = heldout.resolve()
    for link in pool.iterdir():
        if link.name not in wanted or (link.is_symlink() and Path(os.readlink(link)) != wanted[link.name]):
            link.unlink()
    for name, target in wanted.items():
        if not (pool / name).is_symlink():
            (pool / name).symlink_to(target)
    return pool


@dataclass
class Decision:
    promoted: bool
    metric: str
    champion: float
    challenger: float
    delta: float  # challenger - champion
    tolerance: float

    def describe(self) -> str:
        verdict = "promoted" if self.promoted else "kept the champion"
        return (f"{verdict}: {self.metric} {self.challenger:.4f} (challenger) vs {self.champion:.4f} (champion), "
                f"delta {self.delta:+.4f}, tolerance {self.tolerance}")


def gate(champion: dict, challenger: dict, metric: str, tolerance: float) -> Decision:
    """Promote unless the challenger falls below the champion by more than `tolerance`."""
    a, b = float(champion[metric]), float(challenger[metric])
    delta = b - a
    return Decision(promoted=delta >= -tolerance - 1e-12, metric=metric, champion=a, challenger=b, delta=delta,
                    tolerance=tolerance)


def lineage_model(final_dir: Path, out: Path) -> Path:
    """The folder the next round trains from: a whole model. A full fine-tune's final folder is one;
    LoRA adapters are merged into their base in float32 (16-bit would round again every round)."""
    final_dir, out = Path(final_dir), Path(out)
    adapter_config = final_dir / "adapter_config.json"
    if not adapter_config.is_file():
        return final_dir
    if (out / "config.json").is_file():
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, final_dir).merge_and_unload()
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(final_dir).save_pretrained(tmp)
    log.info("merged the adapters of %s into %s: the next round starts from %s", final_dir, base, out)
    return out
