"""The batch schedule (grpoflow/batching.py) and `grpoflow explain-batches`.

The multi-process schedules below were recorded from TRL's own GRPOTrainer (TRL main, v1.9.0-26-gf2cd577)
run on 2 CPU processes (torch.distributed.run, gloo) with a tiny random Llama, shuffle_dataset=False and
TRL's within-process row shuffle (`shuffle_sequence_dict`) switched off, logging the prompt index of every
row each process trained on and accelerate's sync_gradients flag."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpoflow.batching import BatchPlan
from grpoflow.config import ConfigError, GRPOConfig

ROOT = Path(__file__).resolve().parents[1]


def schedule(plan: BatchPlan, n: int) -> list[str]:
    """Each cycle as one line: `[0,0,0] [1,1,1]*`, processes joined by ` | `."""
    lines = []
    for cycle in plan.cycles(n):
        steps = []
        for m in cycle.micro_steps:
            rows = " | ".join("[" + ",".join(map(str, r)) + "]" for r in m.rows_by_process)
            steps.append(rows + ("*" if m.optimizer_update else ""))
        lines.append("  ".join(steps))
    return lines


def per_process(plan: BatchPlan, n: int, p: int) -> str:
    """Process p's micro-steps across n cycles, as TRL's run was logged."""
    out = []
    for cycle in plan.cycles(n):
        for m in cycle.micro_steps:
            out.append("[" + ",".join(map(str, m.rows_by_process[p])) + "]" + ("*" if m.optimizer_update else ""))
    return " ".join(out)


def test_one_group_per_micro_step():
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                     steps_per_generation=4)
    assert (plan.effective_batch_size, plan.unique_prompts) == (12, 4)
    assert (plan.micro_steps_per_generation, plan.optimizer_steps_per_generation) == (4, 2)
    assert schedule(plan, 2) == ["[0,0,0]  [1,1,1]*  [2,2,2]  [3,3,3]*",
                                 "[4,4,4]  [5,5,5]*  [6,6,6]  [7,7,7]*"]


def test_two_groups_per_micro_step():
    plan = BatchPlan(per_device_train_batch_size=6, gradient_accumulation_steps=2, num_generations=3,
                     steps_per_generation=2)
    assert (plan.effective_batch_size, plan.unique_prompts, plan.optimizer_steps_per_generation) == (12, 4, 1)
    assert schedule(plan, 2) == ["[0,0,0,1,1,1]  [2,2,2,3,3,3]*", "[4,4,4,5,5,5]  [6,6,6,7,7,7]*"]


def test_steps_per_generation_defaults_to_gradient_accumulation_steps():
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3)
    assert plan.steps_per_generation == 2
    assert schedule(plan, 2) == ["[0,0,0]  [1,1,1]*", "[2,2,2]  [3,3,3]*"]


def test_num_iterations_replays_the_generation():
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                     steps_per_generation=2, num_iterations=2)
    assert (plan.unique_prompts, plan.micro_steps_per_generation, plan.optimizer_steps_per_generation) == (2, 4, 2)
    assert schedule(plan, 2) == ["[0,0,0]  [1,1,1]*  [0,0,0]  [1,1,1]*",
                                 "[2,2,2]  [3,3,3]*  [2,2,2]  [3,3,3]*"]


def test_two_processes_take_contiguous_blocks_as_trl_does():
    # TRL run: B=3 G=3 steps_per_generation=4 accumulation=2, 2 processes, 4 optimizer steps
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                     steps_per_generation=4, num_processes=2)
    assert (plan.effective_batch_size, plan.unique_prompts, plan.optimizer_steps_per_generation) == (24, 8, 2)
    assert per_process(plan, 2, 0) == "[0,0,0] [1,1,1]* [2,2,2] [3,3,3]* [8,8,8] [9,9,9]* [10,10,10] [11,11,11]*"
    assert per_process(plan, 2, 1) == ("[4,4,4] [5,5,5]* [6,6,6] [7,7,7]* "
                                       "[12,12,12] [13,13,13]* [14,14,14] [15,15,15]*")
    assert schedule(plan, 1) == ["[0,0,0] | [4,4,4]  [1,1,1] | [5,5,5]*  [2,2,2] | [6,6,6]  [3,3,3] | [7,7,7]*"]


def test_a_group_can_straddle_two_processes_as_in_trl():
    # TRL run: B=3 G=2 steps_per_generation=1 accumulation=1, 2 processes
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=1, num_generations=2,
                     steps_per_generation=1, num_processes=2)
    assert per_process(plan, 3, 0) == "[0,0,1]* [3,3,4]* [6,6,7]*"
    assert per_process(plan, 3, 1) == "[1,2,2]* [4,5,5]* [7,8,8]*"


def test_accumulation_is_counted_across_generations_as_in_trl():
    # TRL run: B=3 G=3 steps_per_generation=4 accumulation=3, 2 processes: updates span generations
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=3, num_generations=3,
                     steps_per_generation=4, num_processes=2)
    assert plan.optimizer_steps_per_generation == pytest.approx(4 / 3)
    assert per_process(plan, 3, 0) == ("[0,0,0] [1,1,1] [2,2,2]* [3,3,3] [8,8,8] [9,9,9]* [10,10,10] [11,11,11] "
                                       "[16,16,16]* [17,17,17] [18,18,18] [19,19,19]*")
    assert per_process(plan, 3, 1) == ("[4,4,4] [5,5,5] [6,6,6]* [7,7,7] [12,12,12] [13,13,13]* [14,14,14] "
                                       "[15,15,15] [20,20,20]* [21,21,21] [22,22,22] [23,23,23]*")


def test_replay_on_two_processes_as_in_trl():
    # TRL run: B=3 G=3 steps_per_generation=2 accumulation=2 num_iterations=2, 2 processes
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                     steps_per_generation=2, num_iterations=2, num_processes=2)
    assert per_process(plan, 2, 0) == "[0,0,0] [1,1,1]* [0,0,0] [1,1,1]* [4,4,4] [5,5,5]* [4,4,4] [5,5,5]*"
    assert per_process(plan, 2, 1) == "[2,2,2] [3,3,3]* [2,2,2] [3,3,3]* [6,6,6] [7,7,7]* [6,6,6] [7,7,7]*"


def test_generation_batch_size_gives_steps_per_generation():
    plan = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                     generation_batch_size=12)
    assert plan.steps_per_generation == 4
    assert schedule(plan, 1) == ["[0,0,0]  [1,1,1]*  [2,2,2]  [3,3,3]*"]
    # TRL's generation_batch_size counts every process: 24 on 2 processes is 4 micro-steps each
    two = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                    generation_batch_size=24, num_processes=2)
    assert (two.steps_per_generation, two.unique_prompts) == (4, 8)


def test_from_config_uses_the_grpo_keys():
    grpo = GRPOConfig(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                      generation_batch_size=12, num_iterations=2)
    plan = BatchPlan.from_config(grpo)
    assert (plan.steps_per_generation, plan.unique_prompts, plan.micro_steps_per_generation) == (4, 4, 8)
    assert BatchPlan.from_config(GRPOConfig()).unique_prompts == 1  # defaults: 8 rows, 8 generations
    assert BatchPlan.from_config(GRPOConfig(), num_processes=4).unique_prompts == 4


def test_json_shape():
    plan = BatchPlan(per_device_train_batch_size=6, gradient_accumulation_steps=2, num_generations=3,
                     steps_per_generation=2)
    data = json.loads(json.dumps(plan.to_json(plan.cycles(1))))
    assert data == {"effective_batch_size": 12, "unique_prompts": 4, "num_processes": 1,
                    "per_device_train_batch_size": 6, "rows_per_process": 12, "global_batch_size": 12,
                    "optimizer_steps_per_generation": 1,
                    "cycles": [{"micro_steps": [
                        {"rows_by_process": [[0, 0, 0, 1, 1, 1]], "optimizer_update": False},
                        {"rows_by_process": [[2, 2, 2, 3, 3, 3]], "optimizer_update": True}]}]}


def test_text_marks_updates_and_separates_processes():
    one = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                    steps_per_generation=4)
    lines = one.render(one.cycles(2)).splitlines()
    steps = [line for line in lines if line.startswith("  micro-step")]
    assert steps[:2] == ["  micro-step 0   [0,0,0]", "  micro-step 1   [1,1,1]*  optimizer step 1"]
    assert steps[7] == "  micro-step 7   [7,7,7]*  optimizer step 4"
    assert "generation 1" in lines
    two = BatchPlan(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=3,
                    steps_per_generation=4, num_processes=2)
    assert "  micro-step 1   p0 [1,1,1] | p1 [5,5,5]*  optimizer step 1" in two.render(two.cycles(1)).splitlines()


def error_of(**kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        BatchPlan(**kwargs)
    return str(e.value)


def test_groups_that_do_not_fit_the_generation_batch():
    assert error_of(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_generations=3) == (
        "the generation batch is not a whole number of prompt groups: effective_batch_size = "
        "steps_per_generation 4 x num_processes 1 x per_device_train_batch_size 2 = 8 completions, not a "
        "multiple of num_generations (3). To fix, set num_generations to one of 2, 4, 8, or set "
        "steps_per_generation (it defaults to gradient_accumulation_steps) to a multiple of 3 (e.g. 3 or 6).")
    assert error_of(per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=3,
                    generation_batch_size=8).endswith(
        "set generation_batch_size to a multiple of 6 (e.g. 6 or 12).")
    # fits on 1 process, not on 2 once num_processes counts: 2 x 3 x 2 = 12 is not a multiple of 8
    assert "num_processes 2" in error_of(per_device_train_batch_size=3, gradient_accumulation_steps=1,
                                         num_generations=8, steps_per_generation=2, num_processes=2)


def test_other_errors_name_the_key():
    assert error_of(per_device_train_batch_size=3, gradient_accumulation_steps=1, num_generations=3,
                    generation_batch_size=10) == (
        "generation_batch_size (10) must be a multiple of num_processes x per_device_train_batch_size = 1 x 3 = 3, "
        "since every process trains on per_device_train_batch_size rows a micro-step; try 9 or 12")
    assert error_of(per_device_train_batch_size=3, gradient_accumulation_steps=1, num_generations=1) == (
        "num_generations is 1: GRPO scores each completion against the others of its prompt's group, "
        "so it needs at least 2 (TRL's default is 8)")
    assert error_of(per_device_train_batch_size=3, gradient_accumulation_steps=1, num_generations=3,
                    steps_per_generation=1, generation_batch_size=3).startswith(
        "steps_per_generation (1) and generation_batch_size (3) are both set; set one of them")
    assert error_of(per_device_train_batch_size=0, gradient_accumulation_steps=1, num_generations=3) == (
        "per_device_train_batch_size must be a whole number of at least 1, got 0")


def grpoflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpoflow.cli", "explain-batches", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def rows(report: dict) -> list[list[list[int]]]:
    return [[m["rows_by_process"] for m in c["micro_steps"]] for c in report["cycles"]]


def test_cli_json():
    out = grpoflow("--per-device-train-batch-size", "3", "--gradient-accumulation-steps", "2",
                   "--steps-per-generation", "4", "--num-generations", "3", "--num-processes", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["effective_batch_size"], report["unique_prompts"], report["optimizer_steps_per_generation"]) \
        == (24, 8, 2)
    assert len(report["cycles"]) == 2  # the default
    assert rows(report)[0] == [[[0, 0, 0], [4, 4, 4]], [[1, 1, 1], [5, 5, 5]],
                               [[2, 2, 2], [6, 6, 6]], [[3, 3, 3], [7, 7, 7]]]
    assert [m["optimizer_update"] for m in report["cycles"][1]["micro_steps"]] == [False, True, False, True]


def test_cli_text():
    out = grpoflow("--per-device-train-batch-size", "3", "--gradient-accumulation-steps", "2",
                   "--steps-per-generation", "4", "--num-generations", "3", "--cycles", "1")
    assert out.returncode == 0, out.stderr
    assert "  micro-step 3   [3,3,3]*  optimizer step 2" in out.stdout.splitlines()


def test_cli_reads_the_config_and_flags_override_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("grpo:\n  per_device_train_batch_size: 6\n  gradient_accumulation_steps: 2\n"
                      "  steps_per_generation: 2\n  num_generations: 3\n")
    out = grpoflow("-c", str(config), "--json", "--cycles", "1")
    assert out.returncode == 0, out.stderr
    assert rows(json.loads(out.stdout)) == [[[[0, 0, 0, 1, 1, 1]], [[2, 2, 2, 3, 3, 3]]]]
    # a flag for the other knob replaces the config's steps_per_generation: 6 rows = 1 micro-step
    out = grpoflow("-c", str(config), "--generation-batch-size", "6", "--json", "--cycles", "1")
    assert out.returncode == 0, out.stderr
    assert rows(json.loads(out.stdout)) == [[[[0, 0, 0, 1, 1, 1]]]]
    out = grpoflow("-c", str(config), "--set", "grpo.num_iterations=2", "--per-device-train-batch-size", "3",
                   "--json", "--cycles", "1")
    assert out.returncode == 0, out.stderr
    assert rows(json.loads(out.stdout)) == [[[[0, 0, 0]], [[1, 1, 1]], [[0, 0, 0]], [[1, 1, 1]]]]


def test_cli_errors_are_one_clear_line():
    out = grpoflow("--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "4",
                   "--num-generations", "3")
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    assert "not a multiple of num_generations (3)" in out.stderr
    out = grpoflow("--cycles", "0")
    assert out.returncode == 2 and "--cycles must be at least 1, got 0" in out.stderr


def test_too_few_unique_prompts_warns_with_the_knobs_to_change():
    """The batching guide's rule, unique_prompts = effective_batch_size / num_generations > 2: a warning
    naming the rule and settings that fix it, each of which really gives 3 or more prompts."""
    plan = BatchPlan(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=8)
    [warning] = plan.warnings()
    assert warning.startswith("unique_prompts = effective_batch_size 8 / num_generations 8 = 1: the GRPO batching "
                              "guide says it must be > 2")
    assert "set steps_per_generation to 3 (or generation_batch_size to 24)" in warning
    assert "num_generations to 2 (4 prompts)" in warning
    assert BatchPlan(8, 1, 8, steps_per_generation=3).unique_prompts == 3
    assert BatchPlan(8, 1, 8, generation_batch_size=24).warnings() == []
    # 2 prompts still warns; the suggested steps_per_generation keeps whole groups (3 x 2 = 6 is not a
    # multiple of 4; 6 x 2 = 12 is)
    two = BatchPlan(per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=4,
                    steps_per_generation=4)
    assert two.unique_prompts == 2
    assert "set steps_per_generation to 6 (or generation_batch_size to 12)" in two.warnings()[0]
    assert BatchPlan(2, 1, 4, steps_per_generation=6).unique_prompts == 3
    # processes count: the same per-process batch on 4 processes is 4 prompts
    assert BatchPlan(8, 1, 8, num_processes=4).warnings() == []


def test_explain_batches_and_config_validation_print_the_warning(tmp_path):
    out = grpoflow("--per-device-train-batch-size", "4", "--num-generations", "4", "--steps-per-generation", "2",
                   "--cycles", "1")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stderr.split())  # rich wraps the log line
    assert "unique_prompts = effective_batch_size 8 / num_generations 4 = 2" in text
    assert "set steps_per_generation to 3 (or generation_batch_size to 12)" in text
    assert text.count("unique_prompts =") == 1
    out = grpoflow("--per-device-train-batch-size", "4", "--num-generations", "4", "--steps-per-generation", "4",
                   "--cycles", "1")
    assert out.returncode == 0 and "unique_prompts" not in out.stderr, out.stderr
    config = tmp_path / "c.yaml"
    config.write_text("grpo:\n  num_generations: 4\n  per_device_train_batch_size: 4\n")
    out = subprocess.run([sys.executable, "-m", "grpoflow.cli", "config", "-c", str(config)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "unique_prompts = effective_batch_size 4 / num_generations 4 = 1" in " ".join(out.stderr.split())
