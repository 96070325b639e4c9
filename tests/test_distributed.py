"""Data-parallel training for real: `torchrun --nproc-per-node 2` on CPU (gloo), through the
launcher the flow uses, against a 1-process run with the same global batch; with DDP and with
FSDP2 (grpo.distributed: fsdp).

Sampling is seeded per prompt (grpoflow/rollout/seeded.py), so both runs draw the same prompts
and the same completions; what is left to differ is how the work is split. The optimizer steps
must agree: weights within float32 noise, the same logged rewards, the same loss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpoflow.config import ConfigError
from grpoflow.launch import launch_train
from grpoflow.train.checkpoint import TrainState, trained_weights
from stages.train import TrainResult, run_train
from tests.test_async_rollouts import HALF_TIED
from tests.test_train import config, metrics

WEIGHTS_ATOL = 2e-6  # lr 3e-3: a wrong normaliser or a missing all-reduce moves weights by ~1e-3


def launch(cfg, num_processes: int) -> TrainResult:
    """The train stage on several processes, as the flow runs it (torchrun), read back typed."""
    return TrainResult.from_json(launch_train(cfg, num_processes))


def trained(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    return trained_weights(Path(run_dir) / "checkpoints" / f"step-{step:06d}")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = WEIGHTS_ATOL) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"weights differ by up to {worst:.2e}"


def assert_same_metrics(one: list[dict], two: list[dict]) -> None:
    assert [m["step"] for m in one] == [m["step"] for m in two]  # logged once, by rank 0
    for x, y in zip(one, two):
        for key in ("reward", "reward_std", "rewards/spaces/mean", "completions/mean_length", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6), x["step"]


def two_configs(tmp_path: Path, finetune: str, **grpo):
    """The same global batch: 2 prompts x 4 completions a step, on 1 process or on 2 of 4 rows each."""
    one = config(tmp_path / "one", per_device_train_batch_size=8, num_generations=4, save_steps=1, **grpo)
    two = config(tmp_path / "two", per_device_train_batch_size=4, num_generations=4, save_steps=1, **grpo)
    for cfg in (one, two):
        cfg.model.finetune = finetune
        cfg.model.lora.target_modules = ["q_proj", "v_proj"]
    two.grpo.reward_funcs = one.grpo.reward_funcs  # one file: the runs differ by their split alone
    two.orchestration.train_processes = 2
    return one, two


def prepared(tmp_path: Path, tiny_model: Path, *configs):
    """The CLI inside torchrun prepares the data and resolves the model itself: the same files."""
    from grpoflow.base_model import resolve_model
    from stages.prepare import run_prepare

    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"question": f"Say something about {i}.", "answer": str(i)}) + "\n" for i in range(20)))
    for cfg in configs:
        cfg.data.source, cfg.data.output_dir = str(tmp_path / "rows.jsonl"), tmp_path / "data"
        cfg.data.answer_format = "plain"
        cfg.model.name_or_path = str(tiny_model)
    manifest = run_prepare(configs[0].data)
    return manifest.train_path, manifest.heldout_path, resolve_model(configs[0].model).path


def test_two_processes_step_as_one_full_finetuning_dapo_and_resume_on_one(tiny_model, tmp_path, monkeypatch,
                                                                          capsys):
    one, two = two_configs(tmp_path, "full", max_steps=2, loss_type="dapo", temperature=0.9)
    train, heldout, model = prepared(tmp_path, tiny_model, one, two)
    single = run_train(one, train, heldout, model, progress=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # a host's NCCL setting reaches the ranks as it is
    double = launch(two, 2)
    assert "unchanged: {'NCCL_NVLS_ENABLE': '0'}" in " ".join(capsys.readouterr().err.split())

    assert double.finished and double.steps == 2
    assert Path(double.output_dir).name == Path(single.output_dir).name  # the same run, by its global batch
    for step in (1, 2):
        assert_same_weights(trained(single.output_dir, step), trained(double.output_dir, step))
    assert_same_metrics(metrics(single), metrics(double))
    logged = [json.loads(line) for line in (Path(double.output_dir) / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 8  # log_completions_steps 2: both processes' completions of step 2, written once

    # the 2-process run's step-1 checkpoint (a generation boundary) resumes on 1 process
    resumed_out = tmp_path / "resumed"
    shutil.copytree(Path(double.output_dir).parent, resumed_out)
    run = resumed_out / Path(double.output_dir).name
    shutil.rmtree(run / "checkpoints" / "step-000002")
    shutil.rmtree(run / "final")
    saved = torch.load(run / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
    assert saved["num_processes"] == 2 and len(saved["buffers"]) == 2 and saved["at_generation_boundary"]
    one.grpo.output_dir = resumed_out
    resumed = run_train(one, train, heldout, model, progress=False)
    assert resumed.steps == 2
    assert_same_weights(trained(single.output_dir, 2), trained(resumed.output_dir, 2))


def test_two_processes_sample_ahead_as_one_and_refill_together(tiny_model, tmp_path):
    """rollout.mode async under torchrun: each process samples its block of the next generation in a
    thread while it trains, and the steps are one process's. With dynamic sampling the processes
    agree on each refill over a gloo group of the threads' own, beside the trainer's collectives."""
    one, two = two_configs(tmp_path, "full", max_steps=3, loss_type="dapo")
    for cfg in (one, two):
        cfg.rollout.mode = "async"
    train, heldout, model = prepared(tmp_path, tiny_model, one, two)
    single = run_train(one, train, heldout, model, progress=False)
    double = launch(two, 2)
    for step in (2, 3):  # the two newest checkpoints stay
        # three full-model Adam steps carry the two summation orders' rounding further than one step:
        # up to 2.5e-6 at step 3 here (2026-12-05); a wrong normaliser or a missing all-reduce moves ~1e-3
        assert_same_weights(trained(single.output_dir, step), trained(double.output_dir, step), atol=1e-5)
    assert_same_metrics(metrics(single), metrics(double))
    assert [m["rollout/staleness"] for m in metrics(double)] == [0, 1, 1]

    dynamic = two.model_copy(deep=True)
    reward = tmp_path / "half_tied.py"
    reward.write_text(HALF_TIED)
    dynamic.grpo.reward_funcs, dynamic.grpo.output_dir = [f"{reward}:half_tied"], tmp_path / "dynamic"
    dynamic.grpo.dynamic_sampling, dynamic.grpo.dynamic_sampling_max_draws = True, 16
    steps = metrics(launch(dynamic, 2))
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["dynamic_sampling/frac_reward_zero_std_trained"] == 0 and m["dynamic_sampling/groups_masked"] == 0
    assert sum(m["dynamic_sampling/groups_dropped"] for m in steps) > 0


@pytest.fixture(scope="module")
def lora_single(tiny_model, tmp_path_factory):
    """The 1-process LoRA run the DDP and the FSDP2 runs are compared with (grpo.distributed does
    not change a 1-process run), the 2-process config and the files."""
    tmp_path = tmp_path_factory.mktemp("lora")
    one, two = two_configs(tmp_path, "lora", max_steps=1, loss_type="grpo")
    files = prepared(tmp_path, tiny_model, one, two)
    return run_train(one, *files, progress=False), two, tmp_path


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_step_as_one_lora_grpo_loss(lora_single, distributed, capsys):
    single, two, tmp_path = lora_single
    two = two.model_copy(deep=True)
    two.grpo.distributed, two.grpo.output_dir = distributed, tmp_path / distributed
    double = launch(two, 2)
    assert ("FSDP2, policy" in capsys.readouterr().err) == (distributed == "fsdp")
    a, b = trained(single.output_dir, 1), trained(double.output_dir, 1)
    assert a and all("lora_" in k for k in a)  # the adapters alone are trained
    assert_same_weights(a, b)
    assert_same_metrics(metrics(single), metrics(double))
    assert (Path(double.model_dir) / "adapter_model.safetensors").is_file()


def test_fsdp_two_processes_step_as_one_full_finetuning_and_resume_on_one_or_two(tiny_model, tmp_path, capsys):
    """FSDP2 shards the policy and the KL reference (beta > 0); the checkpoints it writes are the
    1-process layout, and resume on 1 process (no FSDP) and on 2 (FSDP) to the same step 2."""
    one, two = two_configs(tmp_path, "full", max_steps=2, loss_type="dapo", temperature=0.9, beta=0.04,
                           distributed="fsdp")
    train, heldout, model = prepared(tmp_path, tiny_model, one, two)
    single = run_train(one, train, heldout, model, progress=False)  # one process: fsdp has nothing to shard over
    double = launch(two, 2)
    logged = " ".join(capsys.readouterr().err.split())
    for what in ("policy", "KL reference"):
        assert f"FSDP2, {what}: 2 decoder layers and the root (embeddings, norm, lm_head) sharded over 2" in logged
    assert Path(double.output_dir).name == Path(single.output_dir).name
    for step in (1, 2):
        assert_same_weights(trained(single.output_dir, step), trained(double.output_dir, step))
    assert_same_metrics(metrics(single), metrics(double))
    assert [m["kl"] for m in metrics(single)] == pytest.approx([m["kl"] for m in metrics(double)], abs=1e-7)
    saved = torch.load(Path(double.output_dir) / "checkpoints" / "step-000001" / "trainer_state.pt",
                       weights_only=False)
    assert all(isinstance(name, str) for name in saved["optimizer"]["state"])  # gathered, keyed by name
    from transformers import AutoModelForCausalLM

    final = [dict(AutoModelForCausalLM.from_pretrained(r.model_dir).named_parameters()) for r in (single, double)]
    assert_same_weights(*final)  # final/ loads without FSDP

    for processes in (1, 2):  # from the FSDP step-1 checkpoint
        resumed_out = tmp_path / f"resumed-{processes}"
        shutil.copytree(Path(double.output_dir).parent, resumed_out)
        run = resumed_out / Path(double.output_dir).name
        shutil.rmtree(run / "checkpoints" / "step-000002")
        shutil.rmtree(run / "final")
        cfg = one if processes == 1 else two
        cfg.grpo.output_dir = resumed_out
        resumed = run_train(cfg, train, heldout, model, progress=False) if processes == 1 else launch(cfg, 2)
        assert resumed.steps == 2
        assert_same_weights(trained(single.output_dir, 2), trained(resumed.output_dir, 2))


def test_fsdp_pieces_on_two_processes_match_one(tiny_model, tmp_path):
    """tests/fsdp_checks.py: log-probs and their gradients through the chunked and Triton kernels,
    generation from gathered weights with completions of different lengths (and an error inside
    it), the format warm-up, and what vLLM's sync receives."""
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).with_name("fsdp_checks.py")), str(out), str(tiny_model)],
                          capture_output=True, text=True, env=env, timeout=240)  # a hang fails here
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for rank in ranks:
        for case, result in rank.items():
            if not case.startswith("logps/"):
                continue
            assert result["sharded"], case
            if "bfloat16" in case:  # bf16 weights in use against autocast over float32 ones
                assert result["logps_diff"] < 2e-2 and result["grad_diff"] < 2e-2 * result["grad_max"], case
            else:
                assert result["logps_diff"] < 1e-6 and result["grad_diff"] < 1e-6, (case, result)
        assert "model.embed_tokens.weight" in rank["logps/chunked, tied head"]["trained"]  # the tied head's gradient
        assert "lm_head.weight" in rank["logps/chunked, untied head"]["trained"]
        assert all("lora_" in name for name in rank["logps/chunked, LoRA, gradient checkpointing"]["trained"])
        for case in ("generate/full", "generate/LoRA, gradient checkpointing"):
            result = rank[case]
            assert result["same_tokens"], case
            # every unit gathered once around generate (one all-gather each), nothing inside it
            assert result["around"] == [result["units"]] and result["inside"][0]["collectives"] == 0, (case, result)
            # the layers decode without FSDP2's hooks (2 a layer: all Python work, every decoding step),
            # which come back after it in their order (sharded_after_forward needs them)
            assert result["hooks_before"] == 2 and result["inside"][0]["fsdp_hooks"] == 0, (case, result)
            assert result["hooks_back"], (case, result)
            assert result["inside"][0]["gathered"] and result["sharded_after"] and result["sharded_after_forward"], case
            assert result["logps_diff"] < 1e-6 and result["grad_diff"] < 1e-6, (case, result)
        raises = rank["generate raises"]
        assert raises["raised"] == "raised inside generate", raises
        assert raises["sharded_after"] and raises["sharded_after_forward"], raises
        assert raises["logps_diff"] < 1e-6 and raises["grad_diff"] < 1e-6, raises
        warmup = rank["warmup"]  # two warm-up steps at lr 1e-2 moved the weights by 2e-2 on the development machine
        assert warmup["weights_diff"] < WEIGHTS_ATOL and warmup["moved"] > 1e-3 and warmup["report_diff"] < 1e-5
        assert rank["parameters"] == {"names": True, "full_diff": 0.0, "plain_tensors": True, "adapter_names": True,
                                      "adapter_diff": 0.0}
    for case in ("generate/full", "generate/LoRA, gradient checkpointing"):
        assert [rank[case]["lengths"] for rank in ranks] == [[3], [9]], case
        # each process stops when its own completions end: rank 0 does not step on for rank 1's 6 more tokens
        assert [rank[case]["inside"][0]["forwards"] for rank in ranks] == [3, 9], case
    assert [rank["optimizer"]["state"] for rank in ranks] == [["DTensor"], ["DTensor"]]
    assert ranks[0]["optimizer"]["names"] and ranks[0]["optimizer"]["diff"] == 0.0


def test_a_checkpoint_inside_a_generation_resumes_only_on_its_own_number_of_processes(tmp_path):
    inside = {"buffers": [{"rows": 1}, {"rows": 2}], "next_micro": 1, "at_generation_boundary": False}
    assert TrainState.from_saved(inside).buffer_of(tmp_path, rank=1, world_size=2) == {"rows": 2}
    with pytest.raises(ConfigError, match=r"stopped inside a generation \(micro-step 1 of it\) on 2 process\(es\); "
                                          r"this run has 1\. Resume it on 2 process\(es\)"):
        TrainState.from_saved(inside).buffer_of(tmp_path, rank=0, world_size=1)
    boundary = {**inside, "at_generation_boundary": True}
    assert TrainState.from_saved(boundary).buffer_of(tmp_path, rank=0, world_size=4) is None
    before = {"buffer": {"rows": 1}, "next_micro": 1}  # a checkpoint from before data parallelism
    assert TrainState.from_saved(before).buffer_of(tmp_path, rank=0, world_size=1) == {"rows": 1}


def test_groups_that_would_straddle_two_processes_are_refused_before_any_work(tmp_path):
    from grpoflow.config import validate_config

    # 12 completions = 3 prompts x 4: whole groups on 1 process, 6 + 6 rows on 2
    grpo = {"per_device_train_batch_size": 3, "generation_batch_size": 12, "num_generations": 4}
    validate_config({"grpo": grpo})
    with pytest.raises(ConfigError, match=r"orchestration.train_processes is 2: on 2 processes each process takes a "
                                          r"block of per_device_train_batch_size 3 x steps_per_generation 2 = 6 "
                                          r"completions of every generation, not a whole number of prompt groups"):
        validate_config({"grpo": grpo, "orchestration": {"train_processes": 2}})
    with pytest.raises(ConfigError, match=r"orchestration.train_processes is 2: on 2 processes"):
        validate_config({"grpo": {**grpo, "distributed": "fsdp"}, "orchestration": {"train_processes": 2}})
    out = subprocess.run([sys.executable, "-m", "grpoflow.cli", "explain-batches", "--per-device-train-batch-size",
                          "3", "--generation-batch-size", "12", "--num-generations", "4", "--num-processes", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "a group would straddle two processes" in " ".join(out.stderr.split())


def test_explain_batches_splits_the_work_the_same_under_fsdp():
    """FSDP2 shards the model, not the data: each process takes the same rows as under DDP."""
    outs = [subprocess.run([sys.executable, "-m", "grpoflow.cli", "explain-batches", "--set",
                            f"grpo.distributed={distributed}", "--per-device-train-batch-size", "4",
                            "--num-generations", "4", "--num-processes", "2", "--json"],
                           capture_output=True, text=True, timeout=300) for distributed in ("ddp", "fsdp")]
    assert [out.returncode for out in outs] == [0, 0], outs[1].stderr
    assert json.loads(outs[1].stdout) == json.loads(outs[0].stdout)


def test_a_user_error_on_a_rank_reaches_the_launcher_as_one(tmp_path):
    """The ranks report a user's mistake in a file the launcher reads (torchrun itself exits 1 whatever
    failed): the flow gets a UserError with the rank's one line, not retried, not a log to grep."""
    from grpoflow.config import validate_config
    from grpoflow.errors import UserError

    cfg = validate_config({"data": {"source": str(tmp_path / "missing.jsonl"), "output_dir": str(tmp_path / "data")},
                           "grpo": {"output_dir": str(tmp_path / "train")}})
    with pytest.raises(UserError, match=r"^train on 2 processes: .*missing\.jsonl.*does not exist"):
        launch_train(cfg, 2)
