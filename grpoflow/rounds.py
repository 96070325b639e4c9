"""The continuous flow's memory: training rounds on disk, the champion, the row ledger.

    <state_dir>/rounds/0002-<id>/round.json      what the round trains on, from which champion, its decision
                                 train.parquet   the rows offered to it (no other round has them)
                                 trained.parquet those of them a loss saw: the ledger entry, once trained
                                 heldout.parquet the held-out set it is judged on
    <state_dir>/champions/0002/                  a promoted model the next round starts from
    <state_dir>/history.json                     every round: champion vs challenger, decision, export
    <state_dir>/ledger.parquet                   every row ever trained on: id, round, origin

A round folder appears whole or not at all (written aside, then renamed), so its rows are taken
exactly when the round exists; once it has trained, it keeps only the rows its steps reached
(trained.parquet) and the others go back to the pool for a later round. A round moves open -> decided -> done; each step rewrites round.json
atomically, and a restart continues the round that is not done. history.json and ledger.parquet are
views rebuilt from the round folders after every change: the folders are the truth.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grpoflow.atomic import atomic_file, atomic_folder, write_atomic
from grpoflow.clock import now_iso

STATUSES = ("open", "decided", "done")


@dataclass
class Champion:
    round: int  # 0: the base model
    model: str  # a folder a training round can start from (a whole model, not adapters)
    steps: int  # GRPO steps behind it, all rounds of its lineage


@dataclass
class Round:
    round: int
    id: str  # hash of the row ids it trains on
    rows: int
    champion: Champion  # the model it starts from and is compared against
    steps: tuple[int, int]  # the GRPO step range it trains, counted along the champion's lineage
    created_at: str
    status: str = "open"
    training: dict[str, Any] | None = None  # the challenger: model folder, steps, rewards
    decision: dict[str, Any] | None = None  # promoted, metric, champion/challenger figures, delta
    promoted_model: str | None = None  # the champion folder the next round starts from (when promoted)
    export: dict[str, Any] | None = None
    folder: str = field(default="", compare=False)

    @property
    def train_path(self) -> Path:
        return Path(self.folder) / "train.parquet"

    @property
    def heldout_path(self) -> Path:
        return Path(self.folder) / "heldout.parquet"

    @property
    def trained_path(self) -> Path:
        return Path(self.folder) / "trained.parquet"

    @property
    def ledger_path(self) -> Path:
        """The rows this round holds: those trained on once it trained, all offered ones until then."""
        return self.trained_path if self.trained_path.is_file() else self.train_path


class Rounds:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.folder = self.state_dir / "rounds"

    def all(self) -> list[Round]:
        if not self.folder.is_dir():
            return []
        return [load_round(path) for path in sorted(self.folder.iterdir())
                if (path / "round.json").is_file() and not path.name.startswith(".")]

    def unfinished(self) -> Round | None:
        """The round a stop interrupted, to be finished before any new one starts."""
        return next((r for r in self.all() if r.status != "done"), None)

    def champion(self, base_model: str) -> Champion:
        promoted = [r for r in self.all() if r.status == "done" and r.decision and r.decision["promoted"]]
        if not promoted:
            return Champion(round=0, model=base_model, steps=0)
        last = promoted[-1]
        return Champion(round=last.round, model=last.promoted_model, steps=last.steps[1])

    def consumed_ids(self) -> set[str]:
        """Rows trained on, and the rows of a round that has not trained yet (they are its own)."""
        ids: set[str] = set()
        for r in self.all():
            ids.update(pq.read_table(r.ledger_path, columns=["id"]).column("id").to_pylist())
        return ids

    def record_training(self, r: Round, training: dict[str, Any], trained_ids: list[str] | None) -> None:
        """The challenger, and which of the round's rows it was trained on (None: all of them, as a
        result from before trained ids were kept says)."""
        offered = pq.read_table(r.train_path)
        if trained_ids is not None:
            offered = offered.filter(pc.is_in(offered.column("id"), pa.array(sorted(trained_ids), pa.string())))
        with atomic_file(r.trained_path) as tmp:
            pq.write_table(offered, tmp)
        r.training = {**training, "rows_trained": offered.num_rows}
        self.save(r)

    def open(self, train: pa.Table, heldout: Path, champion: Champion, steps: int, row_id: str) -> Round:
        """A new round over `train` (rows no round has), written whole or not at all."""
        rounds = self.all()
        number = rounds[-1].round + 1 if rounds else 1
        r = Round(round=number, id=row_id, rows=train.num_rows, champion=champion,
                  steps=(champion.steps + 1, champion.steps + steps), created_at=now_iso())
        final = self.folder / f"{number:04d}-{row_id[:16]}"
        with atomic_folder(final) as tmp:
            pq.write_table(train, tmp / "train.parquet")
            shutil.copyfile(heldout, tmp / "heldout.parquet")
            _write_json(tmp / "round.json", _to_json(r))
        r.folder = str(final)
        self.write_views()
        return r

    def save(self, r: Round) -> None:
        if r.status not in STATUSES:
            raise ValueError(f"round status {r.status!r}: expected one of {STATUSES}")
        _write_json(Path(r.folder) / "round.json", _to_json(r))
        self.write_views()

    def write_views(self) -> None:
        """history.json and ledger.parquet, for people and the UI; rebuilt from the round folders."""
        rounds = self.all()
        _write_json(self.state_dir / "history.json", [_to_json(r) | {"folder": r.folder} for r in rounds])
        tables = []
        for r in rounds:
            if r.training is None:  # not trained on yet
                continue
            t = pq.read_table(r.ledger_path, columns=["id", "origin"])
            tables.append(t.append_column("round", pa.array([r.round] * t.num_rows, pa.int32())))
        ledger = pa.concat_tables(tables) if tables else pa.table(
            {"id": pa.array([], pa.string()), "origin": pa.array([], pa.string()), "round": pa.array([], pa.int32())})
        with atomic_file(self.state_dir / "ledger.parquet") as tmp:
            pq.write_table(ledger, tmp)


def _to_json(r: Round) -> dict[str, Any]:
    data = asdict(r)
    del data["folder"]
    return data


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def load_round(folder: Path) -> Round:
    folder = Path(folder)
    data = json.loads((folder / "round.json").read_text())
    data["champion"] = Champion(**data["champion"])
    data["steps"] = tuple(data["steps"])
    return Round(**data, folder=str(folder))
