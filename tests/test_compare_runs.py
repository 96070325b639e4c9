"""benchmarks/compare_runs.py: the side-by-side curves and tables RESULTS.md records for several runs,
from grpoflow's metrics.jsonl and TRL's log history (its figures logged as strings)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ours(path: Path, reward_start: float) -> Path:
    steps = [{"step": s, "reward": reward_start + s / 10, "rewards/correctness/mean": s / 100,
              "frac_reward_zero_std": 0.5, "step_seconds": 2.0 if s == 1 else 0.5} for s in range(1, 21)]
    evals = [{"step": s, "eval_scored": 128, "eval_accuracy": a, "eval_accuracy_ci95": [a / 2, a * 2],
              "eval_format_strict": f} for s, a, f in ((0, 0.1, 0.5), (10, 0.2, 0.9), (20, 0.25, 1.0))]
    return _write(path, steps[:10] + evals[:2] + steps[10:] + evals[2:])


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/compare_runs.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_runs_side_by_side_from_ours_and_trls_metrics(tmp_path):
    trl = _write(tmp_path / "trl_metrics.jsonl",
                 [{"step": s, "reward": str(s / 20), "rewards/correctness/mean": "0", "frac_reward_zero_std": "1",
                   "step_time": "0.75"} for s in range(1, 21)] + [{"train_runtime": "20.1", "step": 20}])
    done = _run("--out", tmp_path / "out", "--name", "cmp", f"ours={_ours(tmp_path / 'm.jsonl', 1.0)}",
                f"trl={trl}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # the held-out curve: a row a step, only for the run that evaluated during training
    assert lines[0] == "| step | ours: accuracy (strict format) |"
    assert lines[2:5] == ["| 0 | 10.0% [5.0, 20.0] (50.0%) |", "| 10 | 20.0% [10.0, 40.0] (90.0%) |",
                          "| 20 | 25.0% [12.5, 50.0] (100.0%) |"]
    # the training figures: means of the first and last 10 steps, median step without step 1
    assert "| ours | 20 | 1.550 -> 2.550 | 0.055 -> 0.155 | 0.500 | 0.500 |" in lines
    assert "| trl | 20 | 0.275 -> 0.775 | 0.000 -> 0.000 | 1.000 | 0.750 |" in lines  # strings read as numbers
    png = tmp_path / "out" / "cmp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_a_bad_line_or_argument_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "reward": 1}\n{"step": 2, "rew\n')
    done = _run("--out", tmp_path, f"a={bad}")
    assert done.returncode != 0 and f"{bad}:2: not a JSON line" in done.stderr
    assert "'a': expected NAME=PATH" in _run("--out", tmp_path, "a").stderr
    assert f"b: {tmp_path}/none.jsonl not found" in _run("--out", tmp_path, f"b={tmp_path}/none.jsonl").stderr


def test_curves_against_training_seconds(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from compare_runs import clock
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # ours' step_seconds, TRL's step_time (as strings, read as numbers by load): summed, step 0 at 0
    assert clock([{"step": 1, "step_seconds": 2.0}, {"step": 2, "step_seconds": 0.5}]) == {0: 0.0, 1: 2.0, 2: 2.5}
    assert clock([{"step": 1, "step_time": 0.25}, {"step": 2, "step_time": 0.25}]) == {0: 0.0, 1: 0.25, 2: 0.5}
    done = _run("--x", "seconds", "--out", tmp_path, "--name", "t", f"ours={_ours(tmp_path / 'm.jsonl', 1.0)}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.png").stat().st_size > 20_000
