"""grpoflow/atomic.py: a folder or file appears whole or not at all, and what a killed writer leaves is removed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from grpoflow.atomic import TEMP, atomic_file, atomic_folder, remove_stale, temporary_name, write_atomic


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "merged"
    with atomic_folder(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists() and tmp.name.startswith(TEMP)
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("the writer failed")
    assert (final / "a").read_text() == "1"  # the old content, untouched
    with atomic_folder(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary left


def test_a_file_written_by_another_program_keeps_its_suffix(tmp_path):
    final = tmp_path / "model-q8_0.gguf"
    with atomic_file(final) as tmp:
        assert tmp.suffix == ".gguf" and tmp.parent == tmp_path
        tmp.write_bytes(b"GGUF")
    with pytest.raises(ValueError), atomic_file(final) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert final.read_bytes() == b"GGUF" and [p.name for p in tmp_path.iterdir()] == [final.name]
    write_atomic(tmp_path / "r.json", "{}\n")
    assert (tmp_path / "r.json").read_text() == "{}\n"


def test_only_a_dead_process_temporaries_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    (tmp_path / f"{TEMP}{host}-{dead}-abc123-step-000002").mkdir()  # killed mid-save
    (tmp_path / f"{TEMP}{host}-{dead}-abc123-report.json").write_text("{")
    live = temporary_name(tmp_path / "step-000003")
    live.mkdir()  # this process: still writing
    other_host = tmp_path / f"{TEMP}elsewhere-{dead}-abc123-step-000004"
    other_host.mkdir()  # another machine's process on a shared disk: not ours to judge
    (tmp_path / "step-000001").mkdir()
    removed = remove_stale(tmp_path)
    assert removed == sorted([f"{TEMP}{host}-{dead}-abc123-report.json", f"{TEMP}{host}-{dead}-abc123-step-000002"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, "step-000001"])
    assert str(os.getpid()) in live.name
