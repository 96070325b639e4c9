"""The train stage as a multi-process job: `torchrun --nproc-per-node N -m grpoflow.cli train`.

    report = launch_train(cfg, num_processes=2)     # rank 0's report: TrainResult.as_json()

The flow calls this when orchestration.train_processes > 1, inside the GPU container (or pod) it
runs in. The job inherits this process's environment as it is: NCCL settings the host made
(NCCL_NVLS_ENABLE=0 on shared hosts, NCCL_SOCKET_IFNAME, ...) reach every rank unchanged.

With rollout.placement server and no rollout.server_address, the launcher starts the rollout server
(grpoflow/rollout/server.py) on rollout.server_gpus, gives every rank its address and key, keeps
those GPUs from the ranks (CUDA_VISIBLE_DEVICES), and stops it when the job ends.

A stop asked of this process (SIGTERM to `grpoflow continuous`) reaches the ranks as a file
(grpoflow/stopping.py): they finish their step, checkpoint and end, and StopRequested comes back here.
Signalling torchrun instead would give the ranks its 30 s of grace, then SIGKILL, whatever the step.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from grpoflow.config import PipelineConfig, to_yaml
from grpoflow.errors import ERROR_FILE_ENV, RolloutServerError, UserError
from grpoflow.stopping import STOP_FILE_ENV, StopRequested, stop_requested

ROOT = Path(__file__).resolve().parents[1]  # where `grpoflow`, `stages` and `flows` import from


def torchrun_command(num_processes: int, config_path: Path) -> list[str]:
    # --standalone: a one-machine job on a free port, so two jobs on one host do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
            "-m", "grpoflow.cli", "train", "-c", str(config_path)]


def launch_train(cfg: PipelineConfig, num_processes: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with contextlib.ExitStack() as stack:
        if cfg.rollout.placement == "server" and cfg.rollout.server_address is None:
            cfg = _with_rollout_server(cfg, num_processes, env, stack)
        return _launch(cfg, num_processes, env)


def _with_rollout_server(cfg: PipelineConfig, num_processes: int, env: dict, stack: contextlib.ExitStack):
    """Start the job's rollout server; the config the ranks get, with its address."""
    from grpoflow.base_model import resolve_model
    from grpoflow.rollout.load import server_spec
    from grpoflow.rollout.server import KEY_ENV, start_server, visible_gpus

    rollout = cfg.rollout
    started = start_server(server_spec(cfg, resolve_model(cfg.model).path, num_processes), gpus=rollout.server_gpus,
                           timeout=rollout.server_timeout_s)
    stack.callback(started.close)
    env[KEY_ENV] = started.key.decode()
    if rollout.server_gpus:
        # the ranks train on the GPUs the server does not own
        env["CUDA_VISIBLE_DEVICES"] = ",".join(n for i, n in enumerate(visible_gpus()) if i not in rollout.server_gpus)
    return cfg.model_copy(update={"rollout": rollout.model_copy(update={"server_address": started.address})})


def _launch(cfg: PipelineConfig, num_processes: int, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="grpoflow-launch-") as folder:
        config_path = Path(folder) / "config.yaml"
        config_path.write_text(to_yaml(cfg))
        env[ERROR_FILE_ENV] = str(Path(folder) / "user-error")  # each rank's user error, if it has one
        stop_file = Path(folder) / "stop"
        env[STOP_FILE_ENV] = str(stop_file)
        process = subprocess.Popen(torchrun_command(num_processes, config_path), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        done = threading.Event()
        threading.Thread(target=_pass_stop_on, args=(stop_file, done), daemon=True).start()
        tail: collections.deque[str] = collections.deque(maxlen=60)
        try:
            for line in process.stderr:  # the ranks' logs and progress, passed on as they come
                sys.stderr.write(line)
                tail.append(line)
            stdout = process.stdout.read()
            code = process.wait()
        finally:
            done.set()
        stopped = stop_file.exists()
        reported = sorted(Path(folder).glob("user-error.*"))  # rank order
        user_error = json.loads(reported[0].read_text()) if reported else None
    if code != 0 and stopped:
        raise StopRequested(f"training on {num_processes} processes stopped, as asked (SIGTERM), after its "
                            "current step with a checkpoint; run the same command to resume")
    if code != 0:
        if user_error and user_error["kind"] == "RolloutServerError":  # checkpointed: run again once it answers
            raise RolloutServerError(f"train on {num_processes} processes: {user_error['message']}")
        if user_error:  # a user's mistake a rank reported (a config key, the data, divergence): not retried
            raise UserError(f"train on {num_processes} processes: {user_error['message']}")
        raise RuntimeError(f"torchrun --nproc-per-node {num_processes} grpoflow train exited with {code}; "
                           f"its last lines:\n{''.join(tail)}")
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"grpoflow train on {num_processes} processes printed no report (JSON) on stdout; "
                           f"it printed:\n{stdout[-3000:]}") from None


def _pass_stop_on(stop_file: Path, done: threading.Event) -> None:
    """While the ranks run: a stop asked of this process becomes the file they look for."""
    while not done.wait(0.5):
        if stop_requested():
            stop_file.touch()
            return
