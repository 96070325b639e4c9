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


def one_line_error(out: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("error:" if code == 2 else "failed:")]
    assert len(said) == 1, out.stderr[-3000:]  # (a config's mistakes are listed under it, one a line)
    for word in words:
        assert word in out.stderr, out.stderr[-3000:]


def test_every_command_is_listed_and_has_help_with_examples():
    listed = grpoflow("--help")
    assert listed.returncode == 0
    for name in ("export", "serve", "deploy", "chat"):
        assert re.search(rf"^    {name} ", listed.stdout.split("positional arguments:")[1], flags=re.M), name
        helped = grpoflow(name, "--help")
        assert helped.returncode == 0, helped.stderr
        assert "examples:" in helped.stdout and f"grpoflow {name}" in helped.stdout.split("examples:")[1]
        assert "--set KEY=VALUE" in helped.stdout


def test_export_and_chat_exit_2_on_a_model_that_is_not_there(tmp_path):
    one_line_error(grpoflow("export", "--model", str(tmp_path / "nothing")), 2, "--model", "no such folder")
    (tmp_path / "empty").mkdir()
    one_line_error(grpoflow("export", "--model", str(tmp_path / "empty")), 2, "neither LoRA adapters")
    one_line_error(grpoflow("chat", "--model", str(tmp_path / "nothing"), "hi"), 2, "not a model")
    one_line_error(grpoflow("chat", "--model", str(tmp_path), "--max-new-tokens", "0", "hi"), 2, "at least 1")
    out = grpoflow("export")  # argparse: a required flag missing is a usage error, 2 as well
    assert out.returncode == 2 and "--model" in out.stderr


def test_serve_and_deploy_exit_2_on_a_bad_config():
    one_line_error(grpoflow("serve", "--set", "orchestration.schedule_cron=never"), 2, "schedule_cron")
    one_line_error(grpoflow("deploy", "--set", "grpo.lerning_rate=1"), 2, "lerning_rate")


def test_a_failure_is_exit_1_with_its_cause_on_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    one_line_error(grpoflow("export", "--model", str(broken), "--set", f"export.output_dir={tmp_path / 'out'}"), 1)


def test_chat_streams_an_answer_and_compares_two_models(tiny_model):
    out = grpoflow("chat", "--model", str(tiny_model), "--max-new-tokens", "12", "What is 2 plus 2?")
    assert out.returncode == 0, out.stderr[-3000:]
    streamed, answer_line = out.stdout[:-1].rsplit("\n", 1)
    assert answer_line == "[answer: none in <answer> tags]"  # a random model: noise, no tags
    # what was streamed is the model's greedy answer to the pipeline's prompt, as generate gives it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpoflow.chat import messages
    from grpoflow.config import load_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tokenizer.apply_chat_template(messages(load_config(None, []).data.system_prompt, "What is 2 plus 2?"),
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert streamed == expected and len(tokenizer(expected).input_ids) > 0
    both = grpoflow("chat", "--model", str(tiny_model), "--compare", str(tiny_model), "--max-new-tokens", "12",
                    "What is 2 plus 2?")
    assert both.returncode == 0, both.stderr[-3000:]
    blocks = both.stdout.split("--- ")[1:]
    assert [b.split(" ", 1)[0] for b in blocks] == ["trained", "base"]
    # greedy: the same model answers the same, and as it did alone
    assert blocks[0].split("\n", 1)[1] == blocks[1].split("\n", 1)[1] == out.stdout


def test_chat_without_a_question_reads_them_from_the_prompt(tiny_model):
    done = subprocess.run([sys.executable, "-m", "grpoflow.cli", "chat", "--model", str(tiny_model),
                           "--max-new-tokens", "6"], input="What is 1 plus 1?\nAnd 2 plus 2?\n\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[answer: ") == 2 and done.stdout.count("> ") >= 2


def test_export_then_chat_with_the_gguf_as_with_the_folder(tiny_model, tmp_path):
    out = grpoflow("export", "--model", str(tiny_model), "--set", f"export.output_dir={tmp_path / 'export'}",
                   "--set", "export.quantizations=[q8_0]")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["gguf"] == {"f16": "passed", "q8_0": "passed"} and result["push"] is None
    folder = Path(result["output_dir"])
    for name in ("gguf/model-f16.gguf", "gguf/model-q8_0.gguf", "Modelfile", "export_report.md", "merged/config.json"):
        assert (folder / name).is_file(), name
        if name.startswith("gguf/"):  # each file is said as it is done
            assert re.search(rf"grpoflow\.export: {name}: .* verified", out.stderr), out.stderr[-3000:]
    question = ["--max-new-tokens", "8", "What is 3 plus 4?"]
    from_gguf = grpoflow("chat", "--model", str(folder / "gguf/model-f16.gguf"), *question)
    from_folder = grpoflow("chat", "--model", str(folder / "merged"), *question)
    assert from_gguf.returncode == 0 and from_folder.returncode == 0, from_gguf.stderr[-3000:]
    assert from_gguf.stdout == from_folder.stdout  # f16 and greedy: llama.cpp writes what transformers does
