"""The `grpoflow` command as a user runs it: a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grpoflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpoflow.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_lists_the_commands_and_examples():
    out = grpoflow("--help")
    assert out.returncode == 0
    for word in ("run", "prepare", "model", "config", "grpoflow run --set grpo.learning_rate=1e-5"):
        assert word in out.stdout
    sub = grpoflow("run", "--help")
    assert "--set KEY=VALUE" in sub.stdout and "--stages" in sub.stdout


def test_prepare_from_a_config_file(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps({"q": f"Q{i}?", "a": str(i)}) for i in range(20)) + "\n")
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  source: {source}\n  question_column: q\n  answer_column: a\n"
                      f"  answer_format: plain\n  output_dir: {tmp_path / 'out'}\n")
    out = grpoflow("prepare", "-c", str(config), "--set", "data.heldout_fraction=0.25")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rows"] == {"train": 15, "heldout": 5} and report["cached"] is False
    assert Path(report["output_dir"], "manifest.json").is_file()


def test_user_errors_are_one_clear_line_not_a_traceback(tmp_path):
    out = grpoflow("prepare", "--set", f"data.source={tmp_path / 'none.jsonl'}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"error: data.source: {tmp_path / 'none.jsonl'} does not exist" in " ".join(out.stderr.split())
    out = grpoflow("config", "--set", "grpo.lerning_rate=1")
    assert out.returncode == 2
    assert "grpo.lerning_rate: unknown key; did you mean 'learning_rate'?" in out.stderr
