"""`grpoflow continuous --status`: the continuous flow's state in one place, read from its state folder.

    champion    the model the next round starts from
    rounds      each round: rows offered and trained on, steps, decision
    ledger      rows trained on, rows prepared and waiting for a round
    drops       each file of the drop folder: ready (rows kept, rows rejected by reason, the rejects
                file), quarantined (why, where it went), waiting or ignored (why)

Nothing here runs a stage or changes the state: it only reads what the flow wrote.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from grpoflow.config import PipelineConfig
from grpoflow.rounds import Rounds
from stages.drops import RECORD, read_record

INTAKE = "intake.json"  # the last intake's figures, written by the flow


def continuous_status(cfg: PipelineConfig) -> dict[str, Any]:
    cc = cfg.continuous
    state = Path(cc.state_dir)
    rounds = Rounds(state)
    every = rounds.all()
    champion = asdict(rounds.champion("the base model"))
    intake = json.loads((state / INTAKE).read_text()) if (state / INTAKE).is_file() else None
    ledger = state / "ledger.parquet"
    trained = pq.read_metadata(ledger).num_rows if ledger.is_file() else 0
    return {
        "state_dir": str(state), "drop_dir": str(cc.drop_dir), "champion": champion,
        "rounds": [{"round": r.round, "status": r.status, "rows_offered": r.rows,
                    "rows_trained": (r.training or {}).get("rows_trained"), "steps": list(r.steps),
                    "from_round": r.champion.round, "decision": (r.decision or {}).get("text")} for r in every],
        "ledger": {"rows_trained": trained, "file": str(ledger),
                   "rows_waiting": intake["new_rows"] if intake else None,
                   "min_new_rows": cc.min_new_rows, "last_intake": intake["at"] if intake else None},
        "drops": _drops(state, intake),
    }


def _drops(state: Path, intake: dict[str, Any] | None) -> dict[str, Any]:
    record = read_record(state / RECORD)
    rejects = _rejects_by_drop(Path(intake["rejects"])) if intake and intake.get("rejects") else {}
    drops: dict[str, Any] = {}
    for name, seen in sorted(record["drops"].items()):
        entry = {"status": seen["status"]}
        if seen["status"] == "quarantined":
            entry.update(reason=seen["reason"], moved_to=seen["moved_to"])
        else:
            entry.update(rejected_rows=rejects.get(name, {}), rejects_file=intake.get("rejects") if intake else None)
        drops[name] = entry
    for kind in ("waiting", "ignored"):
        for name, why in record[kind].items():
            drops[name] = {"status": kind, "reason": why}
    return drops


def _rejects_by_drop(path: Path) -> dict[str, dict[str, int]]:
    """Rejected rows per drop and reason, from data prep's rejects.parquet (origins name the pool's
    train-<drop> links)."""
    if not path.is_file():
        return {}
    found: dict[str, dict[str, int]] = {}
    table = pq.read_table(path, columns=["origin", "reason"]).to_pylist()
    for row in table:
        name = Path(row["origin"].rsplit(":", 1)[0]).name
        if name.startswith("train-"):
            by_reason = found.setdefault(name.removeprefix("train-"), {})
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    return found


def describe(status: dict[str, Any]) -> str:
    """The status as text for a terminal."""
    c, ledger = status["champion"], status["ledger"]
    lines = [f"state {status['state_dir']}, drops {status['drop_dir']}",
             f"champion: round {c['round']} ({c['model']}, {c['steps']} GRPO steps)",
             f"ledger: {ledger['rows_trained']} rows trained on; "
             + (f"{ledger['rows_waiting']} waiting (a round needs {ledger['min_new_rows']}), last look {ledger['last_intake']}"
                if ledger["last_intake"] else "no look at the drops yet")]
    if status["rounds"]:
        lines += ["", "round  status   offered  trained  steps      decision"]
        for r in status["rounds"]:
            trained = "-" if r["rows_trained"] is None else str(r["rows_trained"])
            lines.append(f"{r['round']:>5}  {r['status']:<7}  {r['rows_offered']:>7}  {trained:>7}  "
                         f"{r['steps'][0]:>4}-{r['steps'][1]:<5}  {r['decision'] or '-'}")
    if status["drops"]:
        lines += ["", "drops:"]
        for name, d in status["drops"].items():
            if d["status"] == "ready":
                lost = ", ".join(f"{k}: {v}" for k, v in sorted(d["rejected_rows"].items()))
                lines.append(f"  {name}: ready" + (f"; rows rejected ({lost}) in {d['rejects_file']}" if lost else ""))
            elif d["status"] == "quarantined":
                lines.append(f"  {name}: quarantined in {d['moved_to']}: {d['reason']}")
            else:
                lines.append(f"  {name}: {d['status']}: {d['reason']}")
    return "\n".join(lines)
