"""rollout.placement: server on CPU: a rollout server (transformers generate on a tiny random model,
in a process of its own or, for the protocol's tests, in a thread), the trainer pushing its weights
over a gloo process group (LoRA: its adapter files), versions on every batch, push retries, lost
servers (closed, hung) ending a run with a checkpoint that the same call resumes."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpoflow.config import ConfigError, validate_config
from grpoflow.rollout.base import SamplingParams
from grpoflow.rollout.server import RolloutServer, RolloutServerError, ServerEngine, ServerSpec
from grpoflow.train.checkpoint import newest_checkpoint, trained_weights
from stages.train import run_train
from tests.test_train import config, data, metrics

KEY = b"test-key"


def served(cfg, address: str | None = None):
    cfg.rollout.placement = "server"
    cfg.rollout.server_address = address
    return cfg


def samples(result) -> list[tuple]:
    return [(m["reward"], m["reward_std"], m["completions/mean_length"]) for m in metrics(result) if "reward" in m]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_a_server_samples_what_the_colocated_engine_does(tiny_model, tmp_path, finetune):
    """The server started by the trainer, on the same seeds: the same completions at every step, so the
    pushes carried the weights whole (full: every tensor over gloo; LoRA: the adapter files). With the
    importance-sampling correction off, as the colocated transformers engine has it, the same weights,
    and the same answers to the held-out questions when evaluating during training (through the server)."""
    train, heldout = data(tmp_path)
    runs = {}
    for placement in ("colocate", "server"):
        cfg = config(tmp_path / placement, max_steps=3, save_steps=3, vllm_importance_sampling_correction=False,
                     eval_strategy="steps", eval_steps=2, eval_prompts=4)
        cfg.model.finetune = finetune
        cfg.eval.reward_funcs = cfg.grpo.reward_funcs  # the spaces of the answers: a figure that moves
        cfg.rollout.placement = placement
        runs[placement] = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert samples(runs["server"]) == samples(runs["colocate"])
    evaluated = {p: [(r["step"], r["eval_reward"]) for r in metrics(run) if "eval_reward" in r]
                 for p, run in runs.items()}
    assert [step for step, _ in evaluated["server"]] == [0, 2, 3]
    assert len({reward for _, reward in evaluated["server"]}) > 1  # the answers change as the policy does
    for (_, server), (_, colocated) in zip(evaluated["server"], evaluated["colocate"]):
        assert server == pytest.approx(colocated, abs=1e-9)
    colocated = trained_weights(Path(runs["colocate"].output_dir) / "checkpoints" / "step-000003")
    server = trained_weights(Path(runs["server"].output_dir) / "checkpoints" / "step-000003")
    assert colocated.keys() == server.keys()
    for name in colocated:
        torch.testing.assert_close(server[name], colocated[name], rtol=0, atol=1e-6)


# -- the protocol, against a server in a thread ---------------------------------------------------


class ThreadServer:
    """A RolloutServer (transformers, the tiny model) serving from a thread of this process."""

    def __init__(self, model: Path, server_class=RolloutServer):
        self.listener = Listener(("127.0.0.1", 0), authkey=KEY)
        self.address = f"127.0.0.1:{self.listener.address[1]}"
        self.server = server_class(ServerSpec(model_path=str(model)), self.listener, timeout=30)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stopping = True
        self.thread.join(10)


@pytest.fixture
def thread_server(tiny_model):
    server = ThreadServer(tiny_model)
    yield server
    server.close()


def trainer_policy(model: Path, scale: float = 1.0):
    """What a push reads of the trainer's policy: its whole weights (full fine-tuning), here scaled."""
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return SimpleNamespace(is_peft=False, model=net, whole_parameters=lambda: net.named_parameters())


def client(server, tokenizer, rank: int, *, session: str = "run", timeout: float = 30, retries: int = 0) -> ServerEngine:
    return ServerEngine(server.address, KEY, tokenizer, rank=rank, session=session, timeout=timeout,
                        retries=retries, push=rank == 0)


PARAMS = SamplingParams(max_tokens=6, n=2, temperature=1.0)


def test_a_generate_waits_for_its_version_and_requests_waiting_together_share_a_batch(thread_server, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rank0, rank1, rank2 = (client(thread_server, tokenizer, r) for r in range(3))
    prompts = [[[1, 2, 3]], [[4, 5, 6]]]
    replies: dict[int, list] = {}
    for rank, engine in ((1, rank1), (2, rank2)):
        engine.sync_weights(None, 7)  # not rank 0: only the version the next generate asks for
        threading.Thread(target=lambda r=rank, e=engine: replies.__setitem__(
            r, e.generate_ids(prompts[r - 1], PARAMS, seeds=[10 + r]))).start()
    time.sleep(1.5)
    assert replies == {}  # nothing holds step 7's weights yet
    policy = trainer_policy(tiny_model, scale=1.5)
    rank0.sync_weights(policy, 7)
    deadline = time.monotonic() + 30
    while len(replies) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(replies) == {1, 2}
    assert rank1.batched == 2 and rank2.batched == 2  # both waited for step 7: one generate call
    assert thread_server.server.version == ("run", 7)
    # the pushed weights sampled them: the same prompts and seeds, asked alone now, come back the same
    alone = rank0.generate_ids(prompts[0], PARAMS, seeds=[11])
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in replies[1][0]]
    assert rank0.batched == 1
    served_weights = dict(thread_server.server.engine.inner.model.named_parameters())
    for name, p in policy.model.named_parameters():
        assert torch.equal(served_weights[name], p), name


def test_a_generate_before_any_push_is_refused(thread_server, tiny_model):
    engine = client(thread_server, AutoTokenizer.from_pretrained(tiny_model), 1)
    with pytest.raises(Exception, match="before sync_weights"):
        engine.generate_ids([[1, 2]], PARAMS)


class DropsFirstPush(RolloutServer):
    """Takes the first pushes' tensors, then drops the connection before saying it holds them, as a
    network or a restarting server would."""
    drops = 1

    def _receive(self, conn, message):
        if DropsFirstPush.drops > 0:
            DropsFirstPush.drops -= 1
            self.version = None  # as the real server does: weights changed but not confirmed are no version
            self._load_full(message["tensors"])
            self._drop(conn)
            return
        super()._receive(conn, message)


def test_a_failed_push_is_tried_again_on_a_new_connection_never_skipped(tiny_model, caplog):
    server = ThreadServer(tiny_model, DropsFirstPush)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        DropsFirstPush.drops = 1
        engine = client(server, tokenizer, 0, retries=2)
        with caplog.at_level(logging.WARNING, logger="grpoflow.rollout"):
            engine.sync_weights(trainer_policy(tiny_model, 2.0), 3)
        assert "weight push of step 3" in caplog.text and "trying again on a new connection (1 of 2)" in caplog.text
        assert server.server.version == ("run", 3)
        assert engine.generate_ids([[1, 2]], PARAMS, seeds=[1])[0][0].token_ids

        DropsFirstPush.drops = 5  # more failures than retries: an error that names the knob
        engine = client(server, tokenizer, 0, session="other", retries=1)
        with pytest.raises(RolloutServerError, match=r"failed 2 times \(rollout.server_push_retries is 1\)"):
            engine.sync_weights(trainer_policy(tiny_model), 4)
        assert server.server.version is None  # what was not confirmed is served as no version at all
    finally:
        server.close()


def test_a_server_that_does_not_answer_is_lost_within_the_timeout():
    listener = Listener(("127.0.0.1", 0), authkey=KEY)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()  # and says nothing
    started = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"did not answer within rollout.server_timeout_s \(2 s\) while "
                                                 r"saying hello"):
        ServerEngine(f"127.0.0.1:{listener.address[1]}", KEY, None, rank=0, session="s", timeout=2, retries=0,
                     push=True)
    assert time.monotonic() - started < 10
    listener.close()


def test_a_wrong_key_is_refused_with_a_message(thread_server):
    with pytest.raises(RolloutServerError, match="GRPOFLOW_ROLLOUT_KEY"):
        ServerEngine(thread_server.address, b"not-the-key", None, rank=0, session="s", timeout=5, retries=0, push=True)


def test_server_keys_are_checked_and_need_the_server_placement():
    with pytest.raises(ConfigError, match="rollout.server_address.*not host:port"):
        validate_config({"rollout": {"placement": "server", "server_address": "localhost"}})
    given = {"placement": "server", "server_address": "10.0.0.5:47000"}
    assert validate_config({"rollout": given}).rollout.server_address == "10.0.0.5:47000"
    with pytest.raises(ConfigError, match="server_address and server_gpus set, but placement is colocate: they are "
                                          "for placement: server"):
        validate_config({"rollout": {"server_address": "10.0.0.5:47000", "server_gpus": [1]}})


# -- a lost server during training ------------------------------------------------------------------


def losing_the_server_at(monkeypatch, call: int, how: int):
    """The server process this run started gets signal `how` just before the trainer's `call`-th generate."""
    calls = []
    real = ServerEngine.generate_ids

    def generate_ids(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(self.started.process.pid, how)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ServerEngine, "generate_ids", generate_ids)


@pytest.mark.parametrize("how,mode", [("killed", "sync"), ("hung", "sync"), ("killed", "async")])
def test_a_lost_server_ends_the_run_with_a_checkpoint_and_the_same_call_resumes(tiny_model, tmp_path, monkeypatch,
                                                                                  how, mode):
    """Killed: the connection closes, lost at once. Hung (SIGSTOP): lost after rollout.server_timeout_s.
    The step the server was lost in is undone and the prompts drawn since its start go back; the
    resumed run (a new server) trains what the uninterrupted one did, step for step, to the same
    weights. Async: the generations lost are sampled again, by the weights the run resumes with,
    newer than some that sampled them before: a valid run, not the same one."""
    train, heldout = data(tmp_path)
    common = dict(max_steps=5, save_steps=100, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                  steps_per_generation=1)  # a generation each micro-step: the server is lost mid-step
    whole, cfg = (served(config(tmp_path / name, **common)) for name in ("whole", "lost"))
    whole.rollout.mode = cfg.rollout.mode = mode
    whole = run_train(whole, train, heldout, str(tiny_model), progress=False)
    cfg.rollout.server_timeout_s = 3
    losing_the_server_at(monkeypatch, call=6, how=signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(RolloutServerError) as lost:
        run_train(cfg, train, heldout, str(tiny_model), progress=False)
    # a generation a micro-step, two a step: call 6 is step 3's second
    message = str(lost.value)
    assert "Training stopped at step 2 of 5 with a checkpoint" in message and "run the same command" in message
    assert ("went away" if how == "killed" else "did not answer within rollout.server_timeout_s (3 s)") in message
    assert time.monotonic() - started < 60
    out = Path(cfg.grpo.output_dir)
    checkpoint = newest_checkpoint(next(out.iterdir()) / "checkpoints")
    assert checkpoint.name == "step-000002"

    monkeypatch.undo()
    resumed = run_train(cfg, train, heldout, str(tiny_model), progress=False)
    assert resumed.finished and resumed.steps == 5
    if mode == "async":
        assert samples(resumed)[:2] == samples(whole)[:2] and len(metrics(resumed)) == 5
        assert metrics(resumed)[2]["rollout/staleness"] == 0  # step 3's generation: sampled anew, on resume
        return
    assert samples(resumed) == samples(whole)
    a = trained_weights(Path(whole.output_dir) / "checkpoints" / "step-000005")
    b = trained_weights(Path(resumed.output_dir) / "checkpoints" / "step-000005")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_several_training_processes_need_a_server_they_all_reach(tiny_model, tmp_path, monkeypatch):
    from grpoflow.rollout import load, server

    monkeypatch.setattr(server, "start_server", lambda *a, **k: pytest.fail("no server may be started per process"))
    dist = SimpleNamespace(rank=0, world_size=2)
    cfg = served(config(tmp_path))
    with pytest.raises(ConfigError, match="grpoflow rollout-server"):
        load._server_engine(cfg.rollout, str(tiny_model), policy=None, lora_rank=None, dtype="float32",
                            max_model_len=64, seed=0, completions_per_call=4, dist=dist)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_training_processes_share_the_server_the_launcher_starts(tiny_model, tmp_path, distributed):
    """torchrun with 2 processes (gloo) and a rollout server the launcher started: each rank asks for its
    block of every generation, rank 0 pushes (under FSDP2 every rank gathers the shards it sends); the
    same steps as one process with its own engine."""
    from tests.test_distributed import assert_same_metrics, assert_same_weights, launch, prepared, trained, two_configs

    one, two = two_configs(tmp_path, "full", max_steps=2, vllm_importance_sampling_correction=False)
    served(two)
    two.grpo.distributed = distributed
    train, heldout, model = prepared(tmp_path, tiny_model, one, two)
    single = run_train(one, train, heldout, model, progress=False)
    double = launch(two, 2)
    assert double.finished and double.steps == 2
    assert Path(double.output_dir).name == Path(single.output_dir).name  # where it samples is not another run
    for step in (1, 2):
        assert_same_weights(trained(single.output_dir, step), trained(double.output_dir, step))
    assert_same_metrics(metrics(single), metrics(double))
    assert all(m["time/rollout_server_seconds"] >= m["time/rollout_generate_seconds"] > 0 for m in metrics(double))


def test_a_bad_request_drops_its_connection_and_the_server_goes_on(thread_server, tiny_model):
    from multiprocessing.connection import Client

    host, port = thread_server.address.split(":")
    rogue = Client((host, int(port)), authkey=KEY)
    rogue.send(["not", "a", "request"])
    assert rogue.recv() == {"ok": False, "error": "unknown request None"}
    rogue.send({"op": "push", "session": "x", "version": 1, "kind": "full", "tensors": [("w", (2,), "float32")]})
    assert "no weights group" in rogue.recv()["error"]  # full weights need the group a hello with weights opens
    engine = client(thread_server, AutoTokenizer.from_pretrained(tiny_model), 0)
    engine.sync_weights(trainer_policy(tiny_model), 1)
    assert engine.generate_ids([[1, 2]], PARAMS, seeds=[1])[0][0].token_ids
    rogue.close()


def test_the_rollout_server_command_writes_a_private_key_and_serves(tiny_model, tmp_path):
    import json
    import subprocess
    import sys

    from tests.processes import end

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "GRPOFLOW_ROLLOUT_KEY"}
    env["PYTHONPATH"] = str(root)
    key_file = tmp_path / "server.key"
    server = subprocess.Popen([sys.executable, "-m", "grpoflow.cli", "rollout-server", "--model", str(tiny_model),
                               "--key-file", str(key_file), "--set", "rollout.engine=hf"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = json.loads(server.stdout.readline())["address"]
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        engine = ServerEngine(address, key.encode(), AutoTokenizer.from_pretrained(tiny_model), rank=0, session="s",
                              timeout=30, retries=0, push=True)
        engine.sync_weights(trainer_policy(tiny_model), 0)
        [[first, second]] = engine.generate([[{"role": "user", "content": "Hi"}]], PARAMS, seeds=[5])
        assert first.token_ids and second.token_ids and engine.batched == 1
        engine.close()
    finally:
        end(server, 10)
    assert server.returncode == 0  # SIGTERM: a clean stop
    assert key not in server.stderr.read()  # said where the key is, never the key


def test_a_server_lost_by_a_two_process_job_stops_both_ranks_with_one_checkpoint(tiny_model, tmp_path, monkeypatch):
    """The server dies mid-run: both ranks agree it is lost, checkpoint together, and the launcher says so
    (RolloutServerError: exit 75 from the CLI); the same launch on a new server resumes there."""
    from grpoflow.launch import launch_train
    from grpoflow.rollout.load import server_spec
    from grpoflow.rollout.server import KEY_ENV, start_server
    from tests.test_distributed import prepared, two_configs

    _, two = two_configs(tmp_path, "full", max_steps=12)
    two.grpo.save_steps = 100  # the only checkpoint is the one the lost server leaves
    _, _, model = prepared(tmp_path, tiny_model, two)

    def with_server():
        started = start_server(server_spec(two, model, 2), gpus=[], timeout=60)
        monkeypatch.setenv(KEY_ENV, started.key.decode())
        return started, served(two.model_copy(deep=True), started.address)

    first, cfg = with_server()
    logged = Path(cfg.grpo.output_dir)

    def kill_after_two_steps():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            files = list(logged.glob("*/metrics.jsonl"))
            if files and len(files[0].read_text().splitlines()) >= 2:
                first.process.kill()
                return
            time.sleep(0.05)

    threading.Thread(target=kill_after_two_steps, daemon=True).start()
    try:
        with pytest.raises(RolloutServerError, match=r"train on 2 processes: .*Training stopped at step (\d+) of 12 "
                                                     r"with a checkpoint") as lost:
            launch_train(cfg, 2)
    finally:
        first.close()
    stopped_at = int(re.search(r"stopped at step (\d+)", str(lost.value)).group(1))
    assert 2 <= stopped_at < 12
    assert newest_checkpoint(next(logged.iterdir()) / "checkpoints").name == f"step-{stopped_at:06d}"

    second, cfg = with_server()
    try:
        report = launch_train(cfg, 2)
    finally:
        second.close()
    assert report["finished"] and report["steps"] == 12
    steps = [m["step"] for m in metrics(SimpleNamespace(output_dir=report["output_dir"]))]
    assert steps == list(range(1, 13))  # every step logged once: the lost one redone, none twice


def test_a_vllm_server_made_for_other_weights_is_refused_at_hello(thread_server, tiny_model):
    """vLLM is started for LoRA (of some rank) or for full weights; a trainer of the other kind is told
    at once, not at its first push (stand-in: the thread server says it runs vLLM without LoRA)."""
    thread_server.server.engine.name = "vllm"
    with pytest.raises(ConfigError, match=r"started for full fine-tuning, this run trains LoRA of rank 16: start the "
                                          r"server with this run's config"):
        ServerEngine(thread_server.address, KEY, None, rank=0, session="s", timeout=10, retries=0, push=True,
                     lora_rank=16)
    assert client(thread_server, AutoTokenizer.from_pretrained(tiny_model), 0).lora_rank is None  # full: welcome
