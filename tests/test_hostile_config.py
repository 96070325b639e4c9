"""Bad configs and bad command lines, as a careless user or an attacker writes them: each ends in one
clear line naming the key, file or value, exit code 2, quickly, in bounded memory; never a traceback.

The cases run through grpoflow's real entry point (grpoflow.cli.main, in process for speed; one
subprocess case checks the console script end to end).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpoflow import cli
from grpoflow.errors import UserError
from grpoflow.hub import HubPushError, HubRefused

ROOT = Path(__file__).resolve().parents[1]


def alias_bomb(levels: int) -> str:
    """The "billion laughs": each level a list of 9 aliases to the one before, 9**levels values."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


FILES = {  # name -> (file content, what the one-line error must say)
    "not utf-8 (latin-1 byte)": (b"grpo:\n  learning_rate: 1e-5 # caf\xe9\n", "not UTF-8 text (byte 0xe9 at line 2"),
    "utf-16": ("grpo:\n  beta: 0.1\n".encode("utf-16"), "not UTF-8 text"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "alias bomb, 7 levels": (alias_bomb(7).encode(), "expands to more than 100,000 values"),
    "alias bomb, 9 levels": (alias_bomb(9).encode(), "expands to more than 100,000 values"),
    "recursive alias": (b"grpo: &g\n  x: *g\n", "a recursive YAML structure"),
    "deep nesting": (("a: " + "[" * 200 + "]" * 200 + "\n").encode(), "nested more than 100 levels"),
    "duplicate key": (b"grpo:\n  beta: 0.1\n  beta: 0.2\n", "key 'beta' appears twice in one mapping (also at line 2)"),
    "duplicate section": (b"grpo:\n  beta: 0.1\ndata:\n  seed: 1\ngrpo:\n  beta: 0.2\n", "key 'grpo' appears twice"),
    "unclosed list": (b"grpo:\n  reward_funcs: [correctness\n", "not valid YAML at line"),
    "tab indentation": (b"grpo:\n\tbeta: 0.1\n", "not valid YAML"),
    "a list at the top": (b"- grpo\n", "the top level must be a mapping"),
    "a 5000-digit integer": (b"grpo:\n  max_steps: " + b"9" * 5000 + b"\n", "a value YAML cannot read"),
    "huge integer": (b"grpo:\n  max_steps: 100000000000000000000\n",
                     "grpo.max_steps: a 21-digit number is larger than any count"),
    "too big a file": (b"# " + b"x" * (1 << 20) + b"\n", "a config file is a few kilobytes"),
    "inf learning rate": (b"grpo:\n  learning_rate: .inf\n", "grpo.learning_rate: input should be a finite number"),
    "nan in a list": (b"grpo:\n  reward_weights: [1.0, .nan, 1, 1, 1]\n", "grpo.reward_weights.1: input should be a finite"),
    "inf threshold": (b"export:\n  min_cosine:\n    q8_0: -.inf\n", "export.min_cosine.q8_0: input should be a finite"),
    "a long wrong value": (b"grpo:\n  loss_type: " + b"x" * 100_000 + b"\n", "characters)"),
}

SETS = {  # --set values -> what the error must say
    "x=[unclosed": "--set 'x=[unclosed': not valid YAML",
    "grpo.reward_funcs={a: [b": "not valid YAML",
    "grpo.learning_rate=.inf": "grpo.learning_rate: input should be a finite number (got inf)",
    "grpo.temperature=.nan": "grpo.temperature: input should be a finite number",
    "grpo.beta=-.inf": "grpo.beta: input should be a finite number",
    "grpo.max_grad_norm=.inf": "grpo.max_grad_norm: input should be a finite number",
    "grpo.epsilon_high=.inf": "grpo.epsilon_high: input should be a finite number",
    "grpo.vllm_importance_sampling_cap=.inf": "grpo.vllm_importance_sampling_cap: input should be a finite",
    "orchestration.retry_delay_seconds=.inf": "orchestration.retry_delay_seconds: input should be a finite",
    "continuous.tolerance=.nan": "continuous.tolerance: input should be a finite number",
    "grpo.max_steps=99999999999": "grpo.max_steps: 99999999999 is larger than any count",
    "grpo.num_generations=10000000000": "grpo.num_generations: 10000000000 is larger than any count",
    "grpo.seed=4294967296": "grpo.seed: 4294967296 is larger than any count",
    "grpo.seed=-1": "grpo.seed: input should be greater than or equal to 0",
    "eval.seed=-5": "eval.seed: input should be greater than or equal to 0",
    "data.seed=-5": "data.seed: input should be greater than or equal to 0",
    "data.reasoning_gym.size=1e400": "data.reasoning_gym.size",
    "grpo=3": "grpo: expected a section",
    "grpo.beta.x=1": "grpo.beta: input should be a valid number",
    "=1": "expected KEY=VALUE",
    "grpo.lerning_rate=1e-5": "did you mean 'learning_rate'",
    "l0=&a [*a]": "a recursive YAML structure",
}


def run_cli(capsys, *args: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = cli.main(list(args))
    return code, capsys.readouterr().err, time.perf_counter() - start


def assert_one_clear_error(code: int, err: str, seconds: float, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err, err[:2000]
    err = err[err.index("error:"):]  # after any warning the config earned
    assert expected in " ".join(err.split()), err[:2000]
    assert len(err) < 3000, f"an error of {len(err):,} characters"
    assert seconds < 10


@pytest.mark.parametrize("name", FILES)
def test_a_bad_config_file_is_one_line_and_exit_2(name, tmp_path, capsys):
    content, expected = FILES[name]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert_one_clear_error(*run_cli(capsys, "config", "-c", str(path)), expected)


@pytest.mark.parametrize("item", SETS)
def test_a_bad_set_is_one_line_and_exit_2(item, capsys):
    assert_one_clear_error(*run_cli(capsys, "config", "--set", item), SETS[item])


def test_explain_batches_with_huge_counts_refuses_at_once(capsys):
    code, err, seconds = run_cli(capsys, "explain-batches", "--per-device-train-batch-size", "4000000000",
                                 "--num-generations", "4000000000")
    assert_one_clear_error(code, err, seconds, "8,000,000,000 rows here")
    # a batch that is not whole groups, with counts whose divisors no one should enumerate
    code, err, seconds = run_cli(capsys, "explain-batches", "--per-device-train-batch-size", "4294967291",
                                 "--gradient-accumulation-steps", "4294967279", "--num-generations", "4294967295")
    assert_one_clear_error(code, err, seconds, "not a multiple of num_generations (4294967295)")


def test_what_is_fine_stays_fine(tmp_path, capsys):
    """A byte-order mark, anchors and aliases within reason, merge keys overriding their base."""
    path = tmp_path / "good.yaml"
    path.write_bytes("\ufeffgrpo: &g\n  beta: 0.1\n  learning_rate: 1e-5\neval:\n  reward_funcs: [int]\n"
                     "rollout:\n  <<: {engine: hf, sleep: false}\n  sleep: true\n".encode())
    assert cli.main(["config", "-c", str(path), "--set", "grpo.seed=4294967295"]) == 0
    out = capsys.readouterr().out
    assert "beta: 0.1" in out and "seed: 4294967295" in out and "engine: hf" in out and "sleep: true" in out


def test_the_console_script_says_the_same(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    done = subprocess.run([sys.executable, "-m", "grpoflow.cli", "run", "-c", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "alias bomb" in done.stderr


@pytest.mark.parametrize("error,code", [
    (HubRefused("uploading to alice/x: the Hub refused HF_TOKEN (401): check the token"), 2),
    (HubPushError("uploading to alice/x: failed 4 times on transient errors; try again later"), 1)])
def test_a_failed_push_is_one_line(error, code, monkeypatch, capsys):
    """A push refused for a bad token is the user's to fix (exit 2); one that outlasted its retries is
    not, but still one line saying the local files are kept (exit 1)."""
    def push(cfg, args):
        raise error

    monkeypatch.setattr(cli, "_config", push)
    assert cli.main(["config"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(error).split(":")[0] in err
    assert isinstance(error, UserError) == (code == 2)
