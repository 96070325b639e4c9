"""The commands of issue #26 as a user runs them (real subprocesses): export, deploy, serve, chat;
`grpoflow train` saying how far it is where no progress bar draws."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grpoflow(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """stdout and stderr are pipes: not a terminal, as under Prefect, CI or `> run.log`."""
    return subprocess.run([sys.executable, "-m", "grpoflow.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def tiny_run_settings(tmp_path: Path, tiny_model: Path, steps: int) -> list[str]:
    """--set flags for a few GRPO steps of the tiny random model on 12 plain questions."""
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps({"question": f"What is {i} plus 1?", "answer": str(i + 1)})
                                for i in range(12)) + "\n")
    settings = {"data.source": source, "data.answer_format": "plain", "data.heldout_fraction": 0.25,
                "data.output_dir": tmp_path / "data", "model.name_or_path": tiny_model, "model.finetune": "full",
                "model.dtype": "float32", "grpo.max_steps": steps, "grpo.num_generations": 2,
                "grpo.per_device_train_batch_size": 2, "grpo.gradient_accumulation_steps": 1,
                "grpo.max_completion_length": 4, "grpo.max_prompt_length": 96, "grpo.warmup.enabled": "false",
                "grpo.gradient_checkpointing": "false", "grpo.save_steps": 100, "grpo.output_dir": tmp_path / "train"}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_train_without_a_terminal_logs_one_progress_line_per_step(tiny_model, tmp_path):
    out = grpoflow("train", *tiny_run_settings(tmp_path, tiny_model, steps=3))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if re.search(r"grpoflow\.train: step \d+ of 3:", line)]
    assert [re.search(r"step (\d+) of 3", line).group(1) for line in lines] == ["1", "2", "3"], out.stderr[-3000:]
    for line in lines:  # the figures the issue asks for, each on its line
        assert re.search(r"reward -?\d+\.\d{3}, strict format \d+%, step \d+\.\ds, ETA \d+", line), line
    assert lines[-1].endswith("ETA 0s")
    result = json.loads(out.stdout)
    report = json.loads((Path(result["model"]) / "report.json").read_text())
    assert report["reward_window"] == 1  # 3 steps: step 1 against step 3, the middle one in neither
    assert "reward_first_10" not in report
