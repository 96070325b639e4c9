"""The GPU benchmark scripts pass their configs through our real config checks before a device call does.

Device time is scarce: on 2026-12-05 two calls of benchmarks/recipes_gpu.sh lost the GSM8K lane at its
first command, because gsm8k_gpu.sh forced grpo.save_steps=25 on a config that evaluates every 50 steps
(a best checkpoint needs evaluated steps), and a third call's figures were packed with checkpoints into
an archive the device would not hand back. Here the scripts run as they would there, with `python`
replaced by a stand-in that records each command line and answers as a finished run would (it cannot run
vLLM on this machine); every `grpoflow.cli` command recorded is then checked with `load_config`, and
what a script hands back is checked for size and content."""

import gzip
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from grpoflow.config import load_config

ROOT = Path(__file__).resolve().parent.parent

# a stand-in for the GPU machine's python: records its arguments, writes what the scripts wait for
# (a started vLLM engine in the log, the prepared data, a finished run with a final model and a checkpoint)
STAND_IN = """\
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["RECORD"], "a") as record:
    record.write(json.dumps(args) + "\\n")
sets = {k: v for k, v in (args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")}
print("rollout engine: vLLM (stand-in)", file=sys.stderr)
if "data.output_dir" in sets:
    data = Path(sets["data.output_dir"]) / "0123"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.parquet").write_bytes(b"")
if args[:3] == ["-m", "grpoflow.cli", "train"]:
    run = Path(sets["grpo.output_dir"]) / "0123456789abcdef"
    (run / "final").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "step-000060").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "step-000060" / "model.safetensors").write_bytes(os.urandom(6 << 20))
    (run / "final" / "tokenizer.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\\n")
    print(json.dumps({"finished": True, "steps": 60}, indent=2))
elif "benchmarks/trl_recipe.py" in args and not Path(os.environ.get("TRL_RACE_ONCE", "/")).exists():
    Path(os.environ["TRL_RACE_ONCE"]).write_text("")  # vLLM's words when another lane freed memory meanwhile
    print("AssertionError: Error in memory profiling. Initial free memory 104.8 GiB", file=sys.stderr)
    sys.exit(1)
elif "--out" in args:  # benchmarks/trl_recipe.py
    (Path(args[args.index("--out") + 1]) / "final").mkdir(parents=True, exist_ok=True)
    print("{}")
else:
    print("{}")
"""


@pytest.fixture
def device(tmp_path):
    """A PATH whose `python` is the stand-in, and the file it records into."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(f"#!{sys.executable}\n{STAND_IN}")
    shim.chmod(0o755)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'stand-in card, 0 MiB'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}

    def run(script: str, *args: str, **extra: str) -> list[list[str]]:
        done = subprocess.run(["bash", script, *args], cwd=ROOT, env={**env, **extra}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{script} {shlex.join(args)}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return run


def checked_cli_commands(commands: list[list[str]]) -> list[str]:
    """Loads the config of every recorded `python -m grpoflow.cli` command as the CLI would; returns their verbs."""
    verbs = []
    for args in commands:
        if args[:2] != ["-m", "grpoflow.cli"]:
            continue
        config = args[args.index("-c") + 1]
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        try:
            load_config(ROOT / config, overrides)
        except Exception as error:  # the message names the key: show it with the command that hit it
            pytest.fail(f"`python {shlex.join(args)}` would stop at its config:\n{error}")
        verbs.append(args[2])
    return verbs


@pytest.mark.parametrize("config", ["configs/gsm8k-gpu.yaml", "configs/chain-sum-gpu.yaml",
                                    "configs/gsm8k-python-tool-gpu.yaml"])
def test_each_phase_of_the_recipe_script_passes_the_config_checks(device, tmp_path, config):
    run = tmp_path / "run"
    for phase in ["train", "eval-base", "eval-trained"]:
        commands = device("benchmarks/gsm8k_gpu.sh", phase, CONFIG=config, RUN=str(run),
                          SETS="--set rollout.gpu_memory_utilization=0.12")
    assert checked_cli_commands(commands) == ["train", "evaluate", "evaluate"]


def test_the_recipes_lanes_pass_the_config_checks_and_hand_back_one_archive(device, tmp_path):
    back = tmp_path / "back"
    commands = device("benchmarks/recipes_gpu.sh", OUT=str(back), WORK=str(tmp_path / "work"), DEADLINE_S="540",
                      MEMORY="0.12")
    verbs = checked_cli_commands(commands)
    assert verbs.count("train") == 2 and verbs.count("evaluate") >= 4  # 2 base, 2 trained, TRL's
    assert any("benchmarks/trl_recipe.py" in args for args in commands)
    assert "trl: done" in (tmp_path / "work/out/lane-trl.txt").read_text()
    handed_back = sorted(p.name for p in back.iterdir())
    assert len(handed_back) <= 8 and "recipes.tgz" in handed_back  # the device returns at most 8 files


def test_the_tool_lane_trains_and_evaluates_the_python_tool_recipe_beside_its_own_base(device, tmp_path):
    commands = device("benchmarks/recipes_gpu.sh", LANES="tool base", OUT=str(tmp_path / "back"),
                      WORK=str(tmp_path / "w"), DEADLINE_S="540")
    cli = [args for args in commands if args[:2] == ["-m", "grpoflow.cli"]]
    assert sorted(checked_cli_commands(cli)) == ["evaluate", "evaluate", "train"]  # the lanes run side by side
    assert {args[args.index("-c") + 1] for args in cli} == {"configs/gsm8k-python-tool-gpu.yaml"}  # its base too
    assert "gsm8k-python-tool: done" in (tmp_path / "w/out/lane-tool.txt").read_text()


def test_steps_shortens_the_recipe_lanes_and_every_phase_sees_the_same_config(device, tmp_path):
    commands = device("benchmarks/recipes_gpu.sh", LANES="tool base", STEPS="250", OUT=str(tmp_path / "back"),
                      WORK=str(tmp_path / "w"), DEADLINE_S="540")
    cli = [args for args in commands if args[:2] == ["-m", "grpoflow.cli"]]
    assert sorted(checked_cli_commands(cli)) == ["evaluate", "evaluate", "train"]
    assert all("grpo.max_steps=250" in args for args in cli)  # train and both evaluations: one run key


def test_trl_tries_again_when_its_vllm_lost_the_start_up_memory_check(device, tmp_path):
    commands = device("benchmarks/recipes_gpu.sh", LANES="trl", OUT=str(tmp_path / "back"), WORK=str(tmp_path / "w"),
                      TRL_RACE_ONCE=str(tmp_path / "raced"), TRL_RETRY_WAIT_S="0")
    assert sum("benchmarks/trl_recipe.py" in args for args in commands) == 2
    lane = (tmp_path / "w/out/lane-trl.txt").read_text()
    assert "lost the memory check to another lane (try 1)" in lane and "trl: done" in lane


def test_the_loss_comparison_runs_three_losses_and_hands_back_figures_not_weights(device, tmp_path):
    back, work = tmp_path / "back", tmp_path / "work"
    commands = device("benchmarks/losses_gpu.sh", OUT=str(back), WORK=str(work), DEADLINE_S="300", STEPS="60")
    train = [args for args in commands if args[:2] == ["-m", "grpoflow.cli"]]
    assert checked_cli_commands(train) == ["train"] * 3
    losses = [args[args.index("--set") + 1:] for args in train]
    assert [next(a for a in sets if a.startswith("grpo.loss_type=")) for sets in losses] == \
        ["grpo.loss_type=dapo", "grpo.loss_type=cispo", "grpo.loss_type=sapo"]
    [plot] = [args for args in commands if args[0] == "benchmarks/compare_runs.py"]
    assert plot[-3:] == [f"{loss}={work}/{loss}/metrics.jsonl" for loss in ["dapo", "cispo", "sapo"]]
    archive = back / "losses.tgz"
    assert archive.stat().st_size < 1 << 20  # the stand-in wrote 18 MiB of checkpoints: none travel
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert {f"./{loss}/metrics.jsonl" for loss in ["dapo", "cispo", "sapo"]} <= set(names)
    assert not [n for n in names if "checkpoints" in n or "tokenizer" in n or "/final" in n]


def test_the_async_variants_run_one_after_another_and_start_none_past_the_deadline(device, tmp_path):
    back, work = tmp_path / "back", tmp_path / "work"
    commands = device("benchmarks/variants_gpu.sh", VARIANTS="async", TOGETHER="0", OUT=str(back),
                      WORK=str(work), DEADLINE_S="600", STEPS="100")
    train = [args for args in commands if args[:2] == ["-m", "grpoflow.cli"]]
    assert checked_cli_commands(train) == ["train"] * 3
    modes = [[a for a in args if a.startswith(("rollout.mode=", "grpo.dynamic_sampling="))] for args in train]
    assert modes == [["rollout.mode=sync"], ["rollout.mode=async"],
                     ["rollout.mode=async", "grpo.dynamic_sampling=true"]]
    plots = [args for args in commands if args[0] == "benchmarks/compare_runs.py"]
    assert [args[args.index("--name") + 1] for args in plots] == ["async", "async-seconds"]
    assert "--x" in plots[1] and plots[1][plots[1].index("--x") + 1] == "seconds"
    assert (back / "async.tgz").is_file()
    # a deadline too short for a lane starts none (the same command goes on in the next call)
    again = device("benchmarks/variants_gpu.sh", VARIANTS="async", OUT=str(back), WORK=str(tmp_path / "late"),
                   DEADLINE_S="80")
    assert [args for args in again if args[:2] == ["-m", "grpoflow.cli"]] == train
    done = subprocess.run(["bash", "benchmarks/variants_gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "VARIANTS": "nope"}, timeout=60)
    assert done.returncode == 2 and "VARIANTS: losses or async, not 'nope'" in done.stderr
    # SET: settings every lane takes, beside its own
    both = device("benchmarks/variants_gpu.sh", VARIANTS="async", TOGETHER="0", OUT=str(back),
                  WORK=str(tmp_path / "set"), DEADLINE_S="600",
                  SET="grpo.torch_compile=true grpo.expandable_segments=true")
    lanes = [args for args in both if args[:2] == ["-m", "grpoflow.cli"]][len(train):]  # the record adds up
    assert len(lanes) == 3 and all({"grpo.torch_compile=true", "grpo.expandable_segments=true"} <= set(args)
                                   for args in lanes)
    assert checked_cli_commands(lanes) == ["train"] * 3


def test_the_async_benchmark_warms_up_only_where_there_is_a_format_to_learn(device, tmp_path):
    """async runs around TRL's (the headline ratio interleaved); dynamic sampling only after a format
    warm-up, and not on the random Qwen3 shape, where every group ties and each step draws the cap."""
    commands = device("benchmarks/vllm_gpu.sh", "async", OUT=str(tmp_path / "out"),
                      MODELS="/tmp/smollm2 /tmp/qwen3r")
    bench = [args for args in commands if args[0] == "benchmarks/grpo_vs_trl.py"]
    for args in bench:  # every override is one our config takes (grpo_vs_trl.py applies them the same way)
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        try:
            load_config(None, sets)
        except Exception as error:
            pytest.fail(f"`python {shlex.join(args)}` would stop at its config:\n{error}")
    warm = [(args[args.index("--tag") + 1], "grpo.warmup.enabled=true" in args) for args in bench]
    assert warm == [("smollm2-sync", False), ("smollm2-async", False), ("smollm2", False), ("smollm2-async-2", False),
                    ("smollm2-async-dynamic", True),
                    ("qwen3r-sync", False), ("qwen3r-async", False), ("qwen3r", False), ("qwen3r-async-2", False)]


def test_the_step_benchmark_refuses_two_vllm_trainers_in_one_process(tmp_path):
    """vLLM's sleep-mode allocator is one per process: a second engine failed at its start on the H100
    after the first run's six steps, and the whole call's figures went with it."""
    done = subprocess.run([sys.executable, "benchmarks/grpo_vs_trl.py", "--model", "m", "--data", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--engine", "vllm", "--only", "ours",
                           "--kernels", "auto,chunked"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "one trainer a process" in done.stderr


def test_the_step_benchmark_profiles_a_run_with_the_trainers_phases_named(tmp_path, tiny_model):
    """--profile: torch's profiler around the run; its summary names the trainer's phases (the ranges
    StepMeter and the generation open), so a GPU call shows where a step's device time goes."""
    from tests.test_train import data

    (tmp_path / "data").mkdir()
    data(tmp_path / "data")
    done = subprocess.run([sys.executable, "benchmarks/grpo_vs_trl.py", "--model", str(tiny_model), "--data",
                           str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--only", "ours", "--steps", "2",
                           "--prompts", "1", "--max-completion-length", "8", "--set", "model.dtype=float32",
                           "--profile"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "out" / "profile-grpo_vs_trl-ours-ours-auto.txt").read_text()
    for phase in ("grpoflow.generation", "grpoflow.train", "grpoflow.optimizer"):
        assert f"{phase}: 2 calls" in summary  # one a step
    assert "Self CPU" in summary and "by time on the host:" in summary  # the operator tables
    trace = json.loads(gzip.decompress((tmp_path / "out" / "profile-grpo_vs_trl-ours-ours-auto.trace.json.gz")
                                       .read_bytes()))
    ranges = {event["name"] for event in trace["traceEvents"] if event.get("ph") == "X"}
    assert {"grpoflow.generation", "grpoflow.train"} <= ranges  # the timeline, each phase on it
    copies = (tmp_path / "out" / "profile-grpo_vs_trl-ours-ours-auto.copies.txt").read_text()
    # each phase's host time beside its device time, then the copies (none on the CPU): tests/test_trace_copies.py
    assert "| grpoflow.train | 2 |" in copies and "\n0 copies, 0.000 s of device time" in copies
    # the run's metrics stay; its saved model and last checkpoint go (a GPU call's disk filled with them)
    assert list((tmp_path / "out").rglob("metrics.jsonl"))
    assert not list((tmp_path / "out").rglob("checkpoints")) and not list((tmp_path / "out").rglob("final"))


def test_the_contention_mode_measures_each_model_in_a_process_of_its_own(device, tmp_path):
    commands = device("benchmarks/vllm_gpu.sh", "contention", OUT=str(tmp_path / "out"),
                      MODELS="/tmp/qwen3r /tmp/smollm2")
    runs = [args for args in commands if args[0] == "benchmarks/contention.py"]
    assert [args[args.index("--tag") + 1] for args in runs] == ["qwen3r", "smollm2"]
    assert all(args[args.index("--out") + 1] == str(tmp_path / "out" / "bench") for args in runs)


def test_the_profile_mode_profiles_sync_and_async_each_in_a_process_of_its_own(device, tmp_path):
    commands = device("benchmarks/vllm_gpu.sh", "profile", OUT=str(tmp_path / "out"))
    bench = [args for args in commands if args[0] == "benchmarks/grpo_vs_trl.py"]
    assert [args[args.index("--tag") + 1] for args in bench] == ["qwen3r-profile-sync", "qwen3r-profile-async"]
    assert all("--profile" in args and "--only" in args for args in bench)
    assert "rollout.mode=async" in bench[1] and "rollout.mode=async" not in bench[0]


def test_the_overlap_mode_tries_the_stream_priority_and_the_switch_interval_each_in_a_process(device, tmp_path):
    commands = device("benchmarks/vllm_gpu.sh", "async-overlap", OUT=str(tmp_path / "out"))
    bench = [args for args in commands if args[0] == "benchmarks/grpo_vs_trl.py"]
    tags = [args[args.index("--tag") + 1] for args in bench]
    assert tags == ["qwen3r-async", "qwen3r", "qwen3r-async-high", "qwen3r-async-switch", "qwen3r-async-high-switch",
                    "qwen3r-async-carveout"]
    for args in bench:
        assert "--only" in args
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        load_config(None, sets)  # every override is one our config takes
        ours = args[args.index("--only") + 1] == "ours"
        assert ("rollout.mode=async" in sets) == ours
        assert ("rollout.async_priority=high" in sets) == ("high" in args[args.index("--tag") + 1])
        assert ("--switch-interval" in args) == ("switch" in args[args.index("--tag") + 1])
        assert ("--sm-carveout" in args) == ("carveout" in args[args.index("--tag") + 1])


def test_the_step_benchmark_sets_and_records_the_switch_interval_and_the_sm_carveout(tmp_path, tiny_model):
    from tests.test_train import data

    (tmp_path / "data").mkdir()
    data(tmp_path / "data")
    done = subprocess.run([sys.executable, "benchmarks/grpo_vs_trl.py", "--model", str(tiny_model), "--data",
                           str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--only", "ours", "--steps", "2",
                           "--prompts", "1", "--max-completion-length", "8", "--set", "model.dtype=float32",
                           "--switch-interval", "0.0005", "--sm-carveout", "8", "--tag", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "grpo_vs_trl-ours-x.json").read_text())
    assert result["switch_interval"] == pytest.approx(0.0005) and result["sm_carveout"] == 8


def test_the_compile_mode_sets_torch_compile_on_the_compiled_runs_only(device, tmp_path):
    commands = device("benchmarks/vllm_gpu.sh", "compile", OUT=str(tmp_path / "out"))
    bench = [args for args in commands if args[0] == "benchmarks/grpo_vs_trl.py"]
    tags = [args[args.index("--tag") + 1] for args in bench]
    assert tags == ["qwen3r-sync", "qwen3r-sync-compiled", "qwen3r", "qwen3r-async-compiled"]
    for args, tag in zip(bench, tags):
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        load_config(None, sets)
        assert ("grpo.torch_compile=true" in sets) == tag.endswith("compiled")
        assert ("rollout.mode=async" in sets) == ("async" in tag)


def test_set_reaches_every_grpoflow_run_of_a_mode_and_no_trl_run(device, tmp_path):
    commands = device("benchmarks/vllm_gpu.sh", "async-overlap", OUT=str(tmp_path / "out"),
                      SET="grpo.torch_compile=true rollout.async_priority=high")
    bench = [args for args in commands if args[0] == "benchmarks/grpo_vs_trl.py"]
    assert len(bench) == 6
    for args in bench:
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        ours = args[args.index("--only") + 1] == "ours"
        assert ("grpo.torch_compile=true" in sets and "rollout.async_priority=high" in sets) == ours
        assert ours or sets == []


def test_the_headline_mode_runs_the_defaults_without_set_around_async_and_trl(device, tmp_path):
    """One call gives both ratios with their spread: #22's defaults (no SET) and #21's async (SET)."""
    commands = device("benchmarks/vllm_gpu.sh", "headline", OUT=str(tmp_path / "out"),
                      SET="grpo.torch_compile=true grpo.expandable_segments=true")
    bench = [args for args in commands if args[0] == "benchmarks/grpo_vs_trl.py"]
    tags = [args[args.index("--tag") + 1] for args in bench]
    assert tags == ["smollm2-defaults-1", "smollm2-async-1", "smollm2", "smollm2-async-2", "smollm2-defaults-2"]
    for args, tag in zip(bench, tags):
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        load_config(None, sets)
        assert ("grpo.expandable_segments=true" in sets) == ("async" in tag)
        assert ("rollout.mode=async" in sets) == ("async" in tag)
        assert args[args.index("--model") + 1] == "/tmp/smollm2"
        if "defaults" in tag or tag == "smollm2":
            assert sets == []


def test_the_recipe_report_carries_the_tool_figures_of_a_run_with_the_python_tool(tmp_path, monkeypatch):
    """Issue #24 asks RESULTS.md for the tool-call rate and the tool errors: the summary that comes back
    from the device must hold them, from training (tools/*) and from the evaluations (figures.json)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gsm8k_report import summarise

    folder = tmp_path / "train" / "0123456789abcdef"
    folder.mkdir(parents=True)
    step = {"reward": 0.5, "step_seconds": 1.0, "generation/tokens_per_second": 100.0, "completions/mean_length": 80}
    records = [{"step": 0, "eval_accuracy": 0.1, "eval_tool_call_rate": 0.25, "eval_tool_errors": 0.05}]
    records += [{**step, "step": i, "tools/call_frequency": 0.1 * (i > 10) + 0.5, "tools/failure_frequency": 0.2,
                 "completions/mean_turns": 1.5} for i in range(1, 21)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    models = tmp_path / "eval" / "models" / "trained"
    models.mkdir(parents=True)
    (models / "figures.json").write_text(json.dumps({"model": "trained", "accuracy": 0.1, "tool_call_rate": 0.4,
                                                     "tool_call_rate_ci95": [0.3, 0.5], "tool_errors": 0.1}))
    summary = summarise(tmp_path)
    assert summary["tool_call_frequency_first_10"] == pytest.approx(0.5)
    assert summary["tool_call_frequency_last_10"] == pytest.approx(0.6)
    assert summary["tool_failure_frequency_last_10"] == pytest.approx(0.2)
    assert summary["eval_curve"][0]["eval_tool_call_rate"] == 0.25
    assert summary["evaluations"]["trained"]["tool_call_rate_ci95"] == [0.3, 0.5]
    assert summary["evaluations"]["trained"]["tool_errors"] == 0.1
