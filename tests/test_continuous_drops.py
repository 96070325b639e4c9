"""The continuous flow's drop folder and state under faults, without training: bad drops are set aside
with their reason while good ones go on, half-written drops wait, every data-prep suffix is read,
temporaries of killed runs are removed (a live run's never), children die with their parent, and
`grpoflow continuous --status` says all of it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpoflow.atomic import remove_stale_under
from grpoflow.cli import main
from grpoflow.config import validate_config
from grpoflow.reaper import MARK, descendants, marked
from grpoflow.rounds import Rounds
from stages.continuous import intake, round_capacity
from stages.continuous_status import INTAKE, continuous_status, describe
from tests.drops import jsonl, rows

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str | bytes, age_s: float = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def config(root: Path, **continuous) -> dict:
    heldout = write(root / "heldout.jsonl", jsonl(rows(range(500, 503))))
    (root / "drops").mkdir(parents=True, exist_ok=True)
    return {"data": {"answer_format": "gsm8k"},
            "grpo": {"max_steps": 4, "num_generations": 4, "per_device_train_batch_size": 8},
            "continuous": {"drop_dir": str(root / "drops"), "heldout": str(heldout), "state_dir": str(root / "state"),
                           "min_new_rows": 1, "settle_seconds": 30, **continuous}}


def test_bad_drops_are_quarantined_and_good_ones_train(tmp_path):
    cfg = validate_config(config(tmp_path))
    drops = tmp_path / "drops"
    write(drops / "good.jsonl", jsonl(rows(range(0, 3))))
    write(drops / "good.csv", "question,answer\n" + "".join(f'"What is {i} plus {i}?","#### {2 * i}"\n'
                                                          for i in range(10, 12)))
    write(drops / "good.json", json.dumps(rows(range(20, 22))))
    table = pa.Table.from_pylist(rows(range(30, 32)))
    pq.write_table(table, drops / "good.parquet")
    os.utime(drops / "good.parquet", (time.time() - 60,) * 2)
    write(drops / "corrupt.parquet", b"PAR1 this is not parquet at all")
    write(drops / "columns.jsonl", jsonl([{"prompt": "2+2?", "completion": "4"}]))
    write(drops / "notes.txt", "a README someone dropped")
    write(drops / "big.jsonl.part", jsonl(rows(range(40, 42))))  # a download still running
    write(drops / "fresh.jsonl", jsonl(rows(range(50, 52))), age_s=1)  # still changing
    write(drops / ".hidden.jsonl", jsonl(rows(range(60, 62))))

    found = intake(cfg, Rounds(cfg.continuous.state_dir))

    assert sorted(found.drops) == ["good.csv", "good.json", "good.jsonl", "good.parquet"]
    assert found.waiting_rows == 9  # 3 + 2 + 2 + 2, nothing from the files set aside or still arriving
    assert sorted(found.scan.quarantined) == ["columns.jsonl", "corrupt.parquet"]
    assert "cannot be read as parquet" in found.scan.quarantined["corrupt.parquet"]
    assert "no row has the column 'question' (data.question_column); its columns: 'completion', 'prompt'" == \
        found.scan.quarantined["columns.jsonl"]
    assert not (drops / "corrupt.parquet").exists()
    reason = (drops / "rejected" / "corrupt.parquet.reason.txt").read_text()
    assert reason.startswith(f"{drops / 'corrupt.parquet'}: ") and "state" not in reason  # the user's name, not ours
    assert (drops / "rejected" / "columns.jsonl").read_text() == jsonl([{"prompt": "2+2?", "completion": "4"}])
    assert set(found.scan.waiting) == {"big.jsonl.part", "fresh.jsonl", ".hidden.jsonl"}
    assert "notes.txt" in found.scan.ignored and (drops / "notes.txt").exists()

    # the next look: the fresh drop settled, the download was renamed into place; a new bad drop of an
    # already-quarantined name gets a name of its own
    os.utime(drops / "fresh.jsonl", (time.time() - 60,) * 2)
    os.replace(drops / "big.jsonl.part", drops / "big.jsonl")
    write(drops / "corrupt.parquet", b"still not parquet")
    found = intake(cfg, Rounds(cfg.continuous.state_dir))
    assert found.waiting_rows == 13 and "big.jsonl" in found.drops and "fresh.jsonl" in found.drops
    assert (drops / "rejected" / "corrupt-2.parquet").read_bytes() == b"still not parquet"


def test_round_takes_only_what_its_steps_reach(tmp_path):
    cfg = validate_config(config(tmp_path))
    assert round_capacity(cfg) == 8  # 4 steps x (8 completions / 4 per prompt)
    write(tmp_path / "drops" / "big.jsonl", jsonl(rows(range(20))))
    found = intake(cfg, Rounds(cfg.continuous.state_dir))
    assert found.waiting_rows == 20 and found.new_rows.num_rows == 8
    # generations of 4 prompts (steps_per_generation 4, one micro-batch of 1 prompt a step): 5 steps draw two
    cfg = validate_config(config(tmp_path, min_new_rows=1) | {"grpo": {
        "max_steps": 5, "num_generations": 4, "per_device_train_batch_size": 4, "steps_per_generation": 4}})
    assert round_capacity(cfg) == 8


def test_a_round_keeps_only_the_rows_it_trained_on(tmp_path):
    cfg = validate_config(config(tmp_path))
    write(tmp_path / "drops" / "d.jsonl", jsonl(rows(range(12))))
    rounds = Rounds(cfg.continuous.state_dir)
    found = intake(cfg, rounds)
    r = rounds.open(found.new_rows, found.heldout_path, rounds.champion("base"), 4, found.row_id)
    offered = sorted(pq.read_table(r.train_path).column("id").to_pylist())
    assert len(offered) == 8 and rounds.consumed_ids() == set(offered)  # the open round holds its rows
    assert pq.read_table(tmp_path / "state" / "ledger.parquet").num_rows == 0  # nothing trained on yet
    rounds.record_training(r, {"model": "m"}, offered[:5])
    assert rounds.consumed_ids() == set(offered[:5])
    ledger = pq.read_table(tmp_path / "state" / "ledger.parquet").to_pylist()
    assert sorted(x["id"] for x in ledger) == offered[:5] and {x["round"] for x in ledger} == {1}
    again = intake(cfg, rounds)  # the 3 rows not reached are back, with the 4 never offered
    assert again.waiting_rows == 7 and set(offered[5:]) <= set(again.new_rows.column("id").to_pylist())


def test_status_names_every_drop_its_rejects_and_the_ledger(tmp_path, capsys):
    raw = config(tmp_path)
    cfg = validate_config(raw)
    write(tmp_path / "drops" / "a.jsonl", jsonl(rows(range(3)) + rows(range(2))) + "{not json\n")
    write(tmp_path / "drops" / "b.parquet", b"garbage")
    write(tmp_path / "drops" / "c.txt", "x")
    rounds = Rounds(cfg.continuous.state_dir)
    found = intake(cfg, rounds)
    (tmp_path / "state" / INTAKE).write_text(json.dumps({"new_rows": found.waiting_rows, "at": "now",
                                                         "rejects": str(found.manifest.rejects_path)}))
    status = continuous_status(cfg)
    assert status["drops"]["a.jsonl"] == {"status": "ready", "rejected_rows": {"duplicate": 2, "unreadable": 1},
                                          "rejects_file": str(found.manifest.rejects_path)}
    assert status["drops"]["b.parquet"]["status"] == "quarantined"
    assert status["drops"]["c.txt"]["status"] == "ignored"
    assert status["ledger"]["rows_waiting"] == 3 and status["champion"]["round"] == 0
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps(raw))
    assert main(["continuous", "-c", str(cfg_file), "--status"]) == 0
    text = capsys.readouterr().out
    assert "a.jsonl: ready; rows rejected (duplicate: 2, unreadable: 1)" in text
    assert "b.parquet: quarantined in" in text and "c.txt: ignored" in text
    assert describe(status) in text


def test_stale_temporaries_of_dead_processes_go_and_a_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    state = tmp_path / "state"
    left = [state / "train" / "abc" / f".tmp-{host}-{dead}-aaaaaa-final",
            state / "eval" / "models" / f".tmp-{host}-{dead}-bbbbbb-challenger",
            state / "champions" / f".tmp-{host}-{dead}-cccccc-0002",
            state / f".tmp-{host}-{dead}-dddddd-ledger.parquet"]
    live = [state / "champions" / f".tmp-{host}-{os.getpid()}-eeeeee-0003",
            state / "champions" / f".tmp-otherhost-{dead}-ffffff-0004"]  # another host's: not ours to judge
    for p in left[:3] + live:
        (p / "inside").mkdir(parents=True)
    left[3].write_text("half a ledger")
    removed = remove_stale_under(state)
    assert sorted(removed) == sorted(str(p.relative_to(state)) for p in left)
    assert not any(p.exists() for p in left) and all(p.exists() for p in live)


def test_children_die_with_a_killed_parent(tmp_path):
    script = ("import subprocess, sys, time\n"
              "from grpoflow.reaper import watch_children\n"
              "watch_children()\n"
              "kids = [subprocess.Popen(['sleep', '300']), subprocess.Popen(['sleep', '300'], start_new_session=True),\n"
              "        subprocess.Popen(['bash', '-c', 'sleep 300 & wait'])]\n"
              "print('ready', flush=True)\n"
              "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while len(sleeps := [pid for pid in descendants(parent.pid)
                         if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")]) < 3:
        assert time.monotonic() < deadline  # the one in a session of its own and the grandchild too
    # killed at once: the watchdog may not have noted them yet; the mark they inherited finds them
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in sleeps) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in sleeps if Path(f"/proc/{pid}").exists()]


def test_a_drop_being_written_waits_and_no_ready_drop_is_no_error(tmp_path):
    cfg = validate_config(config(tmp_path))
    write(tmp_path / "drops" / "d.jsonl", b'{"question": "What is 1 plus 1?", "answer": "#### 2"}\n{"quest', age_s=0)
    found = intake(cfg, Rounds(cfg.continuous.state_dir))
    assert found.waiting_rows == 0 and found.drops == [] and "d.jsonl" in found.scan.waiting
    assert not (tmp_path / "drops" / "rejected").exists()


def test_the_poll_loop_outlives_a_failed_look_and_stops_when_asked(monkeypatch, capsys):
    import flows.continuous
    from grpoflow import reaper, stopping

    looks = []

    def look(config):
        looks.append(config["continuous"]["poll_seconds"])
        if len(looks) == 1:
            raise OSError("No space left on device")
        stopping.request_stop()  # as SIGTERM would, during the second look
        return {"rounds": []}

    monkeypatch.setattr(flows.continuous, "continuous", look)
    monkeypatch.setattr(reaper, "watch_children", lambda: None)
    monkeypatch.setattr(stopping, "stop_on_sigterm", lambda: None)
    try:
        assert main(["continuous", "--set", "continuous.poll_seconds=1"]) == 0
    finally:
        stopping.clear_stop()
    assert looks == [1, 1]  # the failed look did not end the loop; the stop ended it between looks
    err = capsys.readouterr().err
    assert "this look failed: OSError: No space left on device" in err and "stopped between looks" in err


def test_a_round_needs_max_steps(tmp_path):
    from grpoflow.config import ConfigError
    from stages.continuous import check

    raw = config(tmp_path)
    raw["grpo"] = {"max_steps": None, "num_train_epochs": 1}
    with pytest.raises(ConfigError, match="grpo.max_steps: null, but the continuous flow needs it"):
        check(validate_config(raw))


def test_the_mark_finds_a_child_that_was_never_noted(tmp_path):
    """A process started just before the kill and orphaned at once has no parent link to follow."""
    orphan = subprocess.Popen(["sleep", "300"], env={**os.environ, MARK: "4242-1"}, start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], env={k: v for k, v in os.environ.items() if k != MARK})
    try:
        found = marked("4242-1")
        assert orphan.pid in found and other.pid not in found
    finally:
        orphan.kill()
        other.kill()
