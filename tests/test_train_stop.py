"""A training job asked to stop (SIGTERM: a preempted job, a pod going away, Ctrl-C's polite cousin) ends
its current step, writes a checkpoint and exits 143; the same command resumes there. On several
processes the launcher passes the request on to every rank, which stop together at one step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grpoflow import stopping
from grpoflow.config import to_yaml
from grpoflow.launch import launch_train
from grpoflow.train.checkpoint import newest_checkpoint
from tests.processes import end
from tests.test_distributed import prepared
from tests.test_train import config

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, tiny_model: Path, processes: int = 1):
    cfg = config(tmp_path / "run", max_steps=500, save_steps=500, per_device_train_batch_size=8 // processes)
    cfg.orchestration.train_processes = processes
    prepared(tmp_path, tiny_model, cfg)
    return cfg


def _checkpoints(cfg) -> list[str]:
    return sorted(p.name for p in Path(cfg.grpo.output_dir).glob("*/checkpoints/step-*"))


def _wait_for_steps(cfg, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = list(Path(cfg.grpo.output_dir).glob("*/metrics.jsonl"))
        if logged and len(logged[0].read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    pytest.fail(f"no {steps} steps logged in {timeout} s")


def test_sigterm_ends_the_step_with_a_checkpoint_and_the_same_command_resumes(tiny_model, tmp_path):
    cfg = _job(tmp_path, tiny_model)
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(cfg))
    command = [sys.executable, "-m", "grpoflow.cli", "train", "-c", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(cfg, 2)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=120)
    finally:
        end(job, 10, signal.SIGKILL)
    assert job.returncode == 143, err[-2000:]
    assert "stopped: training stopped at step" in err and "run the same command to resume" in err
    assert out == ""  # no report: the run did not finish
    [checkpoint] = _checkpoints(cfg)  # save_steps 500: this one is the stop's
    stopped_at = int(checkpoint.removeprefix("step-"))
    assert 2 <= stopped_at < 500
    # the same command goes on from there (stopped at once again, by the deadline: a short test)
    again = subprocess.run(command + ["--stop-after", "0"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and f"at step {stopped_at}" in again.stderr
    assert json.loads(again.stdout)["steps"] == stopped_at + 1


def test_a_stop_asked_of_the_launcher_reaches_every_rank(tiny_model, tmp_path):
    cfg = _job(tmp_path, tiny_model, processes=2)
    outcome: dict = {}

    def launch():
        try:
            outcome["report"] = launch_train(cfg, 2)
        except BaseException as e:  # StopRequested is one
            outcome["error"] = e

    thread = threading.Thread(target=launch)
    thread.start()
    try:
        _wait_for_steps(cfg, 2)
        stopping.request_stop()  # what SIGTERM does to `grpoflow continuous`, whose round this is
        thread.join(timeout=240)
    finally:
        stopping.clear_stop()
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), stopping.StopRequested), outcome
    assert "training on 2 processes stopped, as asked" in str(outcome["error"])
    [checkpoint] = _checkpoints(cfg)  # one step for both ranks, written once
    assert 2 <= int(checkpoint.removeprefix("step-")) < 500
    assert newest_checkpoint(next(Path(cfg.grpo.output_dir).glob("*/checkpoints"))) is not None


def test_sigterm_to_the_pipeline_ends_its_training_step_with_a_checkpoint(tiny_model, tmp_path):
    """`grpoflow run` (make pipeline): Prefect's flow engine answers SIGTERM by crashing the run; the
    command puts the graceful stop back for the flow's body"""
    cfg = _job(tmp_path, tiny_model)
    cfg.orchestration.retries = 0
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the ephemeral API, as `make pipeline` on a fresh clone
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        job = subprocess.Popen([sys.executable, "-m", "grpoflow.cli", "run", "--stages", "prepare,model,train",
                                "-c", str(path)], cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for_steps(cfg, 2)
            job.send_signal(signal.SIGTERM)
            job.wait(timeout=120)
        finally:
            end(job, 10, signal.SIGKILL)
    text = log.read_text()
    assert job.returncode == 143, text[-3000:]
    assert "stopped: training stopped at step" in text
    [checkpoint] = _checkpoints(cfg)
    assert 2 <= int(checkpoint.removeprefix("step-")) < 500
