"""Writes cut short (a kill, a full disk): the logs keep whole records, a torn tail costs a warning not
a run, and what a killed checkpoint save leaves behind is removed by the next run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpoflow.jsonl import DamagedLog, append_records, read_records
from grpoflow.train.checkpoint import TEMPORARY, list_checkpoints
from grpoflow.train.log import RunLogger
from stages import train as train_stage
from stages.train import run_train
from test_train import config, data  # tests/ is on sys.path under pytest

LINE_SEPARATORS = "a\u2028b\u2029c\x85d\x1ce\x1df\x1eg\x0bh\x0ci\rj"  # str.splitlines() splits on each


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    append_records(path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    with path.open("ab") as f:
        f.write(b'{"step": 3, "lo')  # the kill came inside the write
    with caplog.at_level(logging.WARNING, logger="grpoflow.jsonl"):
        assert read_records(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert "the last line is torn (15 bytes without a newline" in caplog.text


def test_a_damaged_line_before_the_end_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(DamagedLog, match=r"metrics.jsonl: line 2 is not JSON .*repair or delete that line"):
        read_records(path)


def test_records_keep_characters_that_splitlines_would_split_on(tmp_path):
    path = tmp_path / "completions.jsonl"
    records = [{"step": 1, "completion": LINE_SEPARATORS}, {"step": 1, "completion": "plain"}]
    append_records(path, records)
    assert read_records(path) == records


def in_order(records: list[dict]) -> bool:
    """The records as written, none skipped: (step, k) runs 0/0..7, 1/0..7, ..., ending anywhere."""
    return [(r["step"], r["k"]) for r in records] == [divmod(i, 8) for i in range(len(records))]


def test_a_killed_writer_leaves_only_whole_records(tmp_path):
    """A process appending big records (a group of completions, one write each) killed at random: every
    record a reader gets is whole and in order; at most the unterminated tail is dropped. (A group of
    560 KB is one write() call, but a kill or a reader can still meet it half done: the kernel copies a
    large write page by page. What holds is per record.)"""
    path = tmp_path / "completions.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from grpoflow.jsonl import append_records\n"
        "i = 0\n"
        "while True:\n"
        "    append_records(Path(sys.argv[1]), [{'step': i, 'k': k, 'text': 'x' * 70000} for k in range(8)])\n"
        "    i += 1\n"), str(path)], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while (not path.exists() or path.stat().st_size < 5_000_000) and time.monotonic() < deadline:
            records = read_records(path)  # a reader while the writer writes
            assert all(len(r["text"]) == 70000 for r in records) and in_order(records)
            time.sleep(0.01)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    records = read_records(path)
    assert records and all(len(r["text"]) == 70000 for r in records) and in_order(records)


def test_the_run_logger_drops_a_torn_tail_on_resume(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    append_records(folder / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.2')
    append_records(folder / "completions.jsonl", [{"step": 2, "completion": LINE_SEPARATORS}])
    with caplog.at_level(logging.WARNING, logger="grpoflow.jsonl"):
        logger = RunLogger(folder, resume_step=3, report_to=[], run_name="r", config={})
    assert [r["step"] for r in logger.history] == [1, 2, 3] and "torn" in caplog.text
    # the file is whole again: the next appends follow whole lines
    logger.log(4, {"loss": 0.25})
    assert [r["step"] for r in read_records(folder / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_records(folder / "completions.jsonl")[0]["completion"] == LINE_SEPARATORS


def test_training_resumes_over_a_torn_metrics_line(tiny_model, tmp_path):
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=3)
    first = run_train(cfg, train, heldout, str(tiny_model), progress=False, stop_after_s=0)  # stops after step 1
    metrics = Path(first.output_dir) / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 2, "loss": 0.1, "rew')  # a full disk, a kill inside a write
    done = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert done.finished and [r["step"] for r in read_records(metrics)] == [1, 2, 3]


def test_a_killed_checkpoint_save_is_cleaned_up_and_training_resumes(tiny_model, tmp_path, monkeypatch):
    """Killed inside the save of step 2: the half-written temporary folder goes, training resumes from
    step 1, and an old checkpoint whose removal was cut short goes too."""
    train, heldout = data(tmp_path)
    cfg = config(tmp_path, max_steps=3, save_total_limit=1)
    real_save = train_stage.save_checkpoint
    calls = {"n": 0}

    def killed_on_second(folder, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            (folder / f"{TEMPORARY}step-000002-4242" / "model").mkdir(parents=True)  # what was written
            raise KeyboardInterrupt("killed inside the save")
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(train_stage, "save_checkpoint", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)
    monkeypatch.setattr(train_stage, "save_checkpoint", real_save)
    checkpoints = next(Path(cfg.grpo.output_dir).glob("*/checkpoints"))
    (checkpoints / f"{TEMPORARY}step-000000-removed-99").mkdir()  # a removal that was cut short
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000001"]
    done = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert done.finished and done.steps == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000003"]  # save_total_limit 1, nothing stale
    assert [r["step"] for r in read_records(checkpoints.parent / "metrics.jsonl")] == [1, 2, 3]


def test_a_removed_checkpoint_leaves_no_step_folder_half_deleted(tmp_path, monkeypatch):
    """Removing an old checkpoint renames it out of the step-* names first: a kill inside rmtree leaves a
    .tmp-* folder (removed next time), never a step-* folder without its trainer_state.pt."""
    import shutil

    from grpoflow.train import checkpoint

    old = tmp_path / "step-000001"
    (old / "model").mkdir(parents=True)
    (old / "trainer_state.pt").write_bytes(b"x")

    def killed_rmtree(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._remove(old)
    monkeypatch.undo()
    assert not old.exists() and [p.name.startswith(TEMPORARY) for p in tmp_path.iterdir()] == [True]
    assert checkpoint.remove_temporaries(tmp_path) and list(tmp_path.iterdir()) == []


def test_json_helpers_write_one_line_a_record(tmp_path):
    path = tmp_path / "x.jsonl"
    append_records(path, [{"a": "\n"}, {"b": 1}])
    assert path.read_bytes().count(b"\n") == 2 and json.loads(path.read_text().split("\n")[0]) == {"a": "\n"}
