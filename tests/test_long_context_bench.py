"""benchmarks/long_context.py's smoke mode: a tiny random model, LoRA, completions forced to their
length, activation offload and forwards by token budget together, through the benchmark's own code."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_long_context_benchmark_runs_whole_steps_on_a_tiny_shape(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/long_context.py", "smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "long_context-ours-smoke.json").read_text())
    assert record["status"] == "ok" and record["offload_activations"] and record["max_tokens_per_forward"] == 96
    assert [s["completions/mean_length"] for s in record["steps"]] == [40, 40]  # ignore_eos: every token written
    assert all(s["memory/trainable_gib"] > 0 for s in record["steps"])
    assert "grpoflow.train: policy:" in done.stderr  # grpoflow's own log lines come out
