"""Rollouts from a server of their own (rollout.placement: server): the engine runs in one process
that owns its GPUs, the trainer's processes run elsewhere and ask it for completions.

    server = start_server(spec, gpus=[1], timeout=600)   # or `grpoflow rollout-server` on another host
    engine = ServerEngine(server.address, key, tokenizer, rank=0, session=..., timeout=600, retries=3)
    engine.sync_weights(policy, step)   # rank 0 pushes the weights, tagged with `step`
    groups = engine.generate(prompts, params)   # served once the server holds the weights of `step`

The protocol (PROTOCOL), one connection per training process, messages as dicts over
multiprocessing's authenticated connections (the key: GRPOFLOW_ROLLOUT_KEY, never logged):

    hello     {rank, weights, backend, device, ipc} -> {engine, model, backend, store_port}; weights=True
              (rank 0) also says how the weights will travel: "ipc" when both ends are on the same
              card and the trainer's weights stay where they are (ipc=True: not FSDP shards), else a
              process group of two, the trainer rank 0 and the server rank 1, over NCCL when both ends
              have a GPU and they are different cards, else gloo (via host memory)
    push      {session, version, kind: "full", tensors: [(name, shape, dtype)], handles}: over a group,
              each tensor is then broadcast from the trainer in that order; over "ipc" the server reads
              the trainer's own tensors on the card, through the CUDA IPC handles sent when they were
              first pushed or have moved since (handles None: the ones it holds), and the trainer
              changes nothing until the answer; or {kind: "lora", files: {name: bytes}}, PEFT's
              adapter files (a LoRA run sends its adapters, not the model)
    generate  {ids, params, seeds, want: (session, version)} -> {groups, version}: served only once the
              server holds that version of that session's weights, so a process that asks before rank 0
              has pushed waits, and a batch always says which weights sampled it. Requests for the
              same version and sampling parameters that wait together are run as one batch.

Failures (docs/rollout-server.md): a server that closes the connection is lost at once, one that
does not answer within rollout.server_timeout_s is lost then; either raises RolloutServerError, on
which the trainer writes a checkpoint and stops (stages/train.py); the same command resumes, and
pushes its weights again, once a server answers. A push that fails is tried again on a new
connection rollout.server_push_retries times, never skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from typing import Any, Callable

from grpoflow.errors import ConfigError, EngineError, RolloutServerError
from grpoflow.rollout.base import Completion, Messages, SamplingParams

log = logging.getLogger("grpoflow.rollout")

PROTOCOL = 1
KEY_ENV = "GRPOFLOW_ROLLOUT_KEY"
CONNECT_PATIENCE_S = 30.0  # a refused connection is tried again this long (a server still starting)
START_PATIENCE_S = 300.0  # a server this process starts may take this long to listen (vLLM loads, captures graphs)


# -- the trainer's side --------------------------------------------------------------------------


class ServerEngine:
    """The RolloutEngine interface, answered by a rollout server. Every training process has one;
    rank 0's also pushes the weights (push=True)."""

    name = "server"

    def __init__(self, address: str, key: bytes, tokenizer, *, rank: int, session: str, timeout: float,
                 retries: int, push: bool, sharded: bool = False, lora_rank: int | None = None):
        """sharded: the policy is FSDP2 shards, gathered by every process (a collective) at each push.
        lora_rank: the run's adapters' rank (None: full fine-tuning); the server must be made for it."""
        self.address, self.key, self.tokenizer = address, key, tokenizer
        self.rank, self.session, self.timeout, self.retries = rank, session, timeout, retries
        self.pushes, self.sharded, self.lora_rank = push, sharded, lora_rank
        self.version: int | None = None  # the weights the next generate asks for
        self.timings: dict[str, float] = {}
        self.batched = 0
        self._lock = threading.Lock()  # the rollouts thread (rollout.mode async) and the trainer's take turns
        self._conn: Connection | None = None
        self._group = None
        self.backend: str | None = None
        self._shared: list | None = None  # over "ipc": the tensors whose handles the server holds, kept alive
        self.started: StartedServer | None = None  # a server this process started: stopped by close()
        self._connect()

    # -- RolloutEngine ------------------------------------------------------------------------------

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        return self.generate_ids([self.tokenizer(self.tokenizer.apply_chat_template(
            p, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids for p in prompts],
            params, seeds)  # tokenized as the other engines do

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[Completion]]:
        if self.version is None:
            raise EngineError("ServerEngine.generate before sync_weights: the server does not know which weights to use")
        started = time.perf_counter()
        with self._lock:
            reply = self._ask({"op": "generate", "ids": prompt_ids, "params": dataclasses.asdict(params),
                               "seeds": seeds, "want": (self.session, self.version)},
                              f"generating {len(prompt_ids)} prompts x {params.n}")
        if reply["version"] != [self.session, self.version]:  # the server serves only the version asked for
            raise RolloutServerError(f"the rollout server at {self.address} sampled with weights {reply['version']}, "
                                     f"not step {self.version}'s")
        # time/rollout_server_seconds: the whole request (waiting for the version included); _generate: on the server
        self.timings = {"server": time.perf_counter() - started, "generate": reply["seconds"]}
        self.batched = reply["batched"]  # requests the server ran as one generate call with this one
        return reply["groups"]

    def sync_weights(self, policy, step: int) -> None:
        """Rank 0 sends the policy's weights as they are now, tagged `step`; every process's next
        generate asks for that version."""
        self.version = step
        if not self.pushes:
            if self.sharded:  # the gather is a collective: every process takes part, rank 0 sends
                _gathered(policy)
            return
        weights = _weights_of(policy)  # gathered once, sent again on a retry
        for attempt in range(self.retries + 1):
            try:
                with self._lock:
                    self._push(weights, step)
                return
            except RolloutServerError as e:
                if attempt == self.retries:
                    raise RolloutServerError(
                        f"{e}; the weight push of step {step} failed {attempt + 1} times (rollout.server_push_retries "
                        f"is {self.retries})") from e
                log.warning("weight push of step %d to the rollout server at %s failed (%s); trying again on a new "
                            "connection (%d of %d)", step, self.address, e, attempt + 1, self.retries)
                time.sleep(min(2.0 * (attempt + 1), 10.0))
                self._reconnect()

    def sleep(self) -> None:
        pass  # the server's KV cache is on its own GPUs: nothing of it is on the trainer's

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send({"op": "bye"})
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        self._group, self._shared = None, None
        if self.started is not None:
            self.started.close()
            self.started = None

    # -- the connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        host, port = _split(self.address)
        deadline = time.monotonic() + CONNECT_PATIENCE_S
        while True:
            try:
                self._conn = _timed(lambda: Client((host, port), authkey=self.key), self.timeout,
                                    f"connecting to the rollout server at {self.address}")
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise RolloutServerError(
                        f"no rollout server at {self.address} (connection refused for {CONNECT_PATIENCE_S:.0f} s): "
                        "start it (`grpoflow rollout-server`), or set rollout.server_address") from None
                time.sleep(1.0)
            except Exception as e:  # multiprocessing.AuthenticationError, OSError, our timeout
                if isinstance(e, RolloutServerError):
                    raise
                raise RolloutServerError(f"could not connect to the rollout server at {self.address}: "
                                         f"{type(e).__name__}: {e} (is {KEY_ENV} the server's key?)") from e
        backend = "nccl" if _cuda() else "gloo"
        reply = self._ask({"op": "hello", "protocol": PROTOCOL, "rank": self.rank, "weights": self.pushes,
                           "backend": backend, "device": _device_uuid(), "ipc": not self.sharded},
                          "saying hello")  # FSDP's gathered weights are new tensors at every push: not by reference
        if reply["protocol"] != PROTOCOL:
            raise RolloutServerError(f"the rollout server at {self.address} speaks protocol {reply['protocol']}, "
                                     f"this trainer {PROTOCOL}: run the same grpoflow version on both")
        served = reply["lora_rank"]  # vLLM is made for LoRA of some rank or for full weights; transformers takes either
        if reply["engine"] == "vllm" and ((self.lora_rank is None) != (served is None)
                                          or (served or 0) < (self.lora_rank or 0)):
            self.close()
            raise ConfigError(f"the rollout server at {self.address} was started for "
                              f"{'full fine-tuning' if served is None else f'LoRA up to rank {served}'}, this run "
                              f"trains {'every weight' if self.lora_rank is None else f'LoRA of rank {self.lora_rank}'}: "
                              "start the server with this run's config (model.finetune, model.lora.r)")
        if self.pushes:
            self.backend, self._shared = reply["backend"], None
            if self.backend != "ipc":
                self._group = _timed(lambda: _weights_group(host, reply["store_port"], 0, self.backend, self.timeout),
                                     self.timeout, "opening the weights' process group")
        log.info("rollout server at %s: %s engine, %s%s", self.address, reply["engine"], reply["model"],
                 f"; weights over {reply['backend']}" if self.pushes else "")

    def _reconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._group, self._shared = None, None, None
        try:
            self._connect()
        except RolloutServerError as e:
            log.warning("%s", e)

    def _ask(self, message: dict, what: str) -> dict:
        if self._conn is None:
            raise RolloutServerError(f"not connected to the rollout server at {self.address}")
        try:
            self._conn.send(message)
            return self._answer(what)
        except (EOFError, OSError) as e:
            raise RolloutServerError(f"the rollout server at {self.address} went away while {what} "
                                     f"({type(e).__name__}: {e})") from e

    def _answer(self, what: str) -> dict:
        if not self._conn.poll(self.timeout):
            raise RolloutServerError(f"the rollout server at {self.address} did not answer within "
                                     f"rollout.server_timeout_s ({self.timeout:g} s) while {what}")
        reply = self._conn.recv()
        if not reply.get("ok"):
            raise RolloutServerError(f"the rollout server at {self.address} refused {what}: {reply.get('error')}")
        return reply

    def _push(self, weights: dict, step: int) -> None:
        by_reference = self.backend == "ipc" and weights["header"]["kind"] == "full"
        if self._conn is None or (self._group is None and self.backend != "ipc"):
            raise RolloutServerError(f"not connected to the rollout server at {self.address}")
        message = {"op": "push", "session": self.session, "version": step, **weights["header"]}
        if by_reference:
            message["handles"] = self._handles(weights["tensors"])
        what = f"loading the weights of step {step}"
        try:
            _timed(lambda: self._conn.send(message), self.timeout, f"sending the weights of step {step}")
            if not by_reference:
                for tensor in weights["tensors"]:
                    self._group.broadcast(tensor.cuda() if self.backend == "nccl" else tensor.cpu(), 0).wait()
            reply = self._answer(what)
        except (EOFError, OSError, RuntimeError) as e:  # gloo / NCCL raise RuntimeError when the peer goes
            if isinstance(e, RolloutServerError):
                raise
            raise RolloutServerError(f"the rollout server at {self.address} went away while {what} "
                                     f"({type(e).__name__}: {str(e)[:300]}; a transfer waits at most "
                                     f"rollout.server_timeout_s, {self.timeout:g} s)") from e
        if reply["version"] != [self.session, step]:
            raise RolloutServerError(f"the rollout server at {self.address} holds {reply['version']} after a push of "
                                     f"step {step}")

    def _handles(self, tensors: list) -> list | None:
        """Over "ipc": the tensors' CUDA IPC handles when the server does not hold them yet (a new
        connection, or a tensor that moved); None when it does. Waits for the card to finish writing
        them: the server reads them on its own stream."""
        import torch

        torch.cuda.synchronize()
        layout = [(t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors]
        if self._shared is not None and layout == [(t.data_ptr(), tuple(t.shape), t.dtype) for t in self._shared]:
            return None
        self._shared = None  # until the server answers, it may hold none of them
        handles = [_ipc_handle(t) for t in tensors]
        self._shared = list(tensors)  # alive while the server maps them
        return handles


def _gathered(policy):
    """The weights a push sends, whole: a LoRA policy's adapters (None: the model's own state dict),
    or every (name, weight). Under FSDP2 a collective: every process calls it."""
    if policy.is_peft:
        return policy.whole_trained_weights(every_process=True)
    return [(name, t.detach().contiguous()) for name, t in policy.whole_parameters()]


def _weights_of(policy) -> dict:
    """What a push sends: a LoRA policy's adapter files (PEFT's), or every weight."""
    weights = _gathered(policy)
    if policy.is_peft:
        with tempfile.TemporaryDirectory(prefix="grpoflow-push-") as folder:
            policy.model.save_pretrained(folder, state_dict=weights)
            files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        return {"header": {"kind": "lora", "files": files}, "tensors": []}
    return {"header": {"kind": "full", "tensors": [(n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                                                   for n, t in weights]},
            "tensors": [t for _, t in weights]}


# -- the server's side --------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """What the server's engine is: the trainer's (or `grpoflow rollout-server`'s) config, as plain data."""
    model_path: str
    engine: str = "hf"  # "vllm" or "hf"
    dtype: str = "bfloat16"
    lora_rank: int | None = None
    max_model_len: int = 1024
    seed: int = 0
    gpu_memory_utilization: float | str = 0.9  # the server's GPUs are its own; "auto": rollout/sizing.py
    enforce_eager: bool = False
    seed_per_prompt: bool = False
    completions_per_call: int | None = None
    largest_call: int | None = None  # evaluation during training may ask for more than a generation
    quantization: str | None = None  # "bitsandbytes": vLLM's weights in 4 bits (LoRA only)
    kv_cache_dtype: str = "auto"


class RolloutServer:
    def __init__(self, spec: ServerSpec, listener: Listener, *, timeout: float):
        self.spec, self.listener, self.timeout = spec, listener, timeout
        self.host = listener.address[0]  # the weights' rendezvous listens where the server does
        self.engine = _server_engine(spec)
        self.clients: list[Connection] = []
        self._new: list[Connection] = []
        self._new_lock = threading.Lock()
        self.group = None
        self.backend: str | None = None
        self.shared: list | None = None  # over "ipc": the trainer's tensors, mapped from its handles
        self.version: tuple[str, int] | None = None  # (session, step) of the weights held
        self.pending: list[tuple[Connection, dict]] = []
        self.stopping = False

    def serve(self, parent_pid: int | None = None) -> None:
        """Until `stopping` (SIGTERM), or the process `parent_pid` is gone (the trainer that started it)."""
        threading.Thread(target=self._accept, daemon=True).start()
        try:
            while not self.stopping:
                if parent_pid is not None and not _alive(parent_pid):
                    log.info("rollout server: the trainer that started it is gone; stopping")
                    return
                with self._new_lock:
                    self.clients += self._new
                    self._new = []
                for conn in wait(self.clients, timeout=0.5) if self.clients else _nap(0.5):
                    self._read(conn)
                self._serve_pending()
        finally:
            self.stopping = True
            self.listener.close()  # the accepting thread's accept() returns
            for conn in self.clients:
                conn.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn = self.listener.accept()  # checks the key
            except Exception as e:  # a client with the wrong key, a port scan
                if self.stopping:
                    return
                log.warning("rollout server: refused a connection (%s: %s)", type(e).__name__, e)
                continue
            with self._new_lock:
                self._new.append(conn)

    def _read(self, conn: Connection) -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            self._drop(conn)
            return
        op = message.get("op") if isinstance(message, dict) else None
        try:
            if op == "hello":
                self._hello(conn, message)
            elif op == "push":
                self._receive(conn, message)
            elif op == "generate":
                self.pending.append((conn, message))
            elif op == "bye":
                self._drop(conn)
            else:
                conn.send({"ok": False, "error": f"unknown request {op!r}"})
        except (EOFError, OSError):
            self._drop(conn)
        except Exception as e:  # noqa: BLE001  one client's failure never ends the server
            log.warning("rollout server: %s request failed (%s: %s); dropping that connection", op, type(e).__name__, e)
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if conn in self.clients:
            self.clients.remove(conn)
        self.pending = [(c, m) for c, m in self.pending if c is not conn]
        conn.close()

    def _hello(self, conn: Connection, message: dict) -> None:
        reply = {"ok": True, "protocol": PROTOCOL, "engine": self.engine.name, "model": self.spec.model_path,
                 "lora_rank": self.spec.lora_rank}
        if message.get("weights"):
            import torch.distributed as torch_dist

            same_card = message.get("device") is not None and message.get("device") == _device_uuid()
            self.group, self.shared = None, None  # a new trainer (or a retry): the old group is gone with its peer
            if same_card and message.get("ipc"):
                self.backend = "ipc"  # NCCL refuses two ranks on one card; gloo would copy through host memory
                reply.update(backend="ipc")
                conn.send(reply)
                return
            backend = "nccl" if message.get("backend") == "nccl" and _cuda() and not same_card else "gloo"
            store = torch_dist.TCPStore(self.host, 0, 2, True, timeout=datetime.timedelta(seconds=self.timeout),
                                        wait_for_workers=False)
            reply.update(store_port=store.port, backend=backend)
            conn.send(reply)
            self.group = _weights_group_on(store, 1, backend, self.timeout)
            self._store, self.backend = store, backend
            return
        conn.send(reply)

    def _receive(self, conn: Connection, message: dict) -> None:
        """A weight push: adapters in the message, or tensors over the process group."""
        version = (message["session"], message["version"])
        started = time.perf_counter()
        try:
            if message["kind"] == "lora":
                self._use_adapters(message["files"])
            elif self.backend == "ipc":
                self._load_shared(message["tensors"], message.get("handles"))
            else:
                self._load_full(message["tensors"])
        except (RuntimeError, ValueError, KeyError) as e:
            self.version = None  # part of the weights may have changed: no version is whole
            if message["kind"] == "full" and self.backend != "ipc":
                self.group = None  # a broadcast that failed half-way leaves the group unusable: a new hello
            conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        self.version = version
        log.info("weights of step %d loaded (%s) in %.2fs", version[1], message["kind"], time.perf_counter() - started)
        conn.send({"ok": True, "version": list(version)})

    def _load_full(self, header: list) -> None:
        import torch

        if self.group is None:
            raise RuntimeError("a push of full weights with no weights group (say hello with weights=True first)")
        device = "cuda" if self.backend == "nccl" else "cpu"

        def received():
            for name, shape, dtype in header:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                self.group.broadcast(tensor, 0).wait()
                yield name, tensor

        self.engine.load_weights(received())

    def _load_shared(self, header: list, handles: list | None) -> None:
        """Full weights read from the trainer's own tensors on this card (CUDA IPC)."""
        import torch

        if handles is not None:
            if len(handles) != len(header):
                raise ValueError(f"a push of {len(header)} tensors with {len(handles)} handles")
            self.shared = None
            self.shared = [_from_ipc(h) for h in handles]
        if self.shared is None or len(self.shared) != len(header):
            raise RuntimeError("a push by reference with no handles held (say hello, then push with handles)")
        for (name, shape, _), tensor in zip(header, self.shared):
            if tuple(shape) != tuple(tensor.shape):
                raise ValueError(f"pushed weight {name!r}: shape {tuple(shape)}, the mapped tensor's {tuple(tensor.shape)}")
        self.engine.load_weights((name, tensor) for (name, _, _), tensor in zip(header, self.shared))
        torch.cuda.synchronize()  # read before the answer lets the trainer write them again

    def _use_adapters(self, files: dict[str, bytes]) -> None:
        def write(folder: Path) -> None:
            folder.mkdir(parents=True)
            for name, data in files.items():
                (folder / Path(name).name).write_bytes(data)  # names only: nothing lands outside the folder

        self.engine.use_adapters(write)

    def _serve_pending(self) -> None:
        """Run every waiting request the weights held can answer; those for the same sampling
        parameters as one batch."""
        due = [(c, m) for c, m in self.pending if self.version is not None and tuple(m["want"]) == self.version]
        if not due:
            return
        self.pending = [p for p in self.pending if p not in due]
        batches: dict[str, list[tuple[Connection, dict]]] = {}
        for conn, message in due:
            batches.setdefault(json.dumps([message["params"], message["seeds"] is None], sort_keys=True), []).append(
                (conn, message))
        for batch in batches.values():
            params = SamplingParams(**batch[0][1]["params"])
            ids = [i for _, m in batch for i in m["ids"]]
            seeds = None if batch[0][1]["seeds"] is None else [s for _, m in batch for s in m["seeds"]]
            started = time.perf_counter()
            try:
                groups = self.engine.generate_ids(ids, params, seeds)
            except Exception as e:  # the request's fault or the engine's: the trainer hears it, the server goes on
                log.exception("rollout server: generate failed")
                for conn, _ in batch:
                    self._reply(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            seconds = time.perf_counter() - started
            log.info("sampled %d prompts x %d with step %d's weights (%d request(s)) in %.2fs", len(ids), params.n,
                     self.version[1], len(batch), seconds)
            start = 0
            for conn, message in batch:
                count = len(message["ids"])
                self._reply(conn, {"ok": True, "groups": groups[start:start + count], "version": list(self.version),
                                   "seconds": seconds, "batched": len(batch)})
                start += count

    def _reply(self, conn: Connection, message: dict) -> None:
        try:
            conn.send(message)
        except OSError:
            self._drop(conn)


def _server_engine(spec: ServerSpec):
    if spec.engine == "vllm":
        from transformers import AutoTokenizer

        from grpoflow.rollout.vllm import VLLMEngine

        return VLLMEngine(spec.model_path, AutoTokenizer.from_pretrained(spec.model_path), dtype=spec.dtype,
                          gpu_memory_utilization=spec.gpu_memory_utilization, max_model_len=spec.max_model_len,
                          seed=spec.seed, lora_rank=spec.lora_rank, sleep=False, enforce_eager=spec.enforce_eager,
                          seed_per_prompt=spec.seed_per_prompt, completions_per_call=spec.completions_per_call,
                          largest_call=spec.largest_call, quantization=spec.quantization,
                          kv_cache_dtype=spec.kv_cache_dtype)
    return ServedTransformers(spec)


class ServedTransformers:
    """transformers generate in the server (a machine without vLLM, the CPU tests): the model loaded
    from spec.model_path, its weights replaced by each push (LoRA: the adapters, on the base model)."""

    def __init__(self, spec: ServerSpec):
        from grpoflow.rollout.hf import transformers_engine

        # loaded as the evaluation engine loads it (bfloat16 on a GPU, float32 on the CPU)
        self.inner = transformers_engine(spec.model_path, batch_size=max(1, spec.completions_per_call or 16),
                                         progress=False)
        self.name, self.tokenizer = "hf", self.inner.tokenizer

    def generate_ids(self, prompt_ids, params, seeds=None):
        return self.inner.generate_ids(prompt_ids, params, seeds)

    def load_weights(self, named) -> None:
        import torch

        params = dict(self.inner.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named:
                if name not in params:
                    raise KeyError(f"the pushed weight {name!r} is not one of the served model's")
                params[name].copy_(tensor)

    def use_adapters(self, write: Callable[[Path], None]) -> None:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory(prefix="grpoflow-served-lora-") as scratch:  # read into memory, then gone
            folder = Path(scratch) / "adapters"
            write(folder)
            if isinstance(self.inner.model, PeftModel):
                set_peft_model_state_dict(self.inner.model, load_file(folder / "adapter_model.safetensors"))
            else:
                self.inner.model = PeftModel.from_pretrained(self.inner.model, folder).eval()
                self.inner._generate = self.inner.model.generate


# -- starting one --------------------------------------------------------------------------------


class StartedServer:
    """A rollout server this process started (rollout.server_address null); stopped by close()."""

    def __init__(self, process: subprocess.Popen, address: str, key: bytes):
        self.process, self.address, self.key = process, address, key

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            os.kill(self.process.pid, signal.SIGCONT)  # a stopped (hung) server takes its SIGTERM too
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(spec: ServerSpec, *, gpus: list[int], timeout: float) -> StartedServer:
    """The server in a process of its own, on `gpus` ([]: this process's card), listening on a free
    local port with a fresh key; waits until it listens (at most `timeout`, or START_PATIENCE_S if
    longer: a start loads the model and vLLM captures its CUDA graphs; one that fails ends at once)."""
    key = secrets.token_hex(32)
    env = dict(os.environ, **{KEY_ENV: key})
    if gpus:
        names = visible_gpus()
        missing = [g for g in gpus if g >= len(names)]
        if missing:
            raise RolloutServerError(f"rollout.server_gpus {gpus}: this machine shows {len(names)} GPU(s) "
                                     f"(CUDA_VISIBLE_DEVICES), so {missing} is not one of them")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(names[g] for g in gpus)
    where = f"GPUs {gpus}" if gpus else "this process's card"
    log.info("starting a rollout server on %s: %s engine, %s (it loads the model first)", where, spec.engine,
             spec.model_path)
    with tempfile.TemporaryDirectory(prefix="grpoflow-server-") as folder:
        ready = Path(folder) / "address"
        process = subprocess.Popen(
            [sys.executable, "-m", "grpoflow.rollout.server", "--spec", json.dumps(dataclasses.asdict(spec)),
             "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready), "--parent-pid", str(os.getpid()),
             "--timeout", str(timeout)], env=env)
        patience = max(timeout, START_PATIENCE_S)
        deadline = time.monotonic() + patience
        while not ready.is_file():
            if process.poll() is not None:
                raise RolloutServerError(f"the rollout server ended with {process.returncode} while starting "
                                         f"(its log is above); model {spec.model_path}")
            if time.monotonic() > deadline:
                process.kill()
                raise RolloutServerError(f"the rollout server did not start within {patience:g} s "
                                         f"(rollout.server_timeout_s, at least {START_PATIENCE_S:g} s)")
            time.sleep(0.2)
        address = ready.read_text()
    log.info("rollout server started: %s on %s in %.0fs", address, where, time.monotonic() - (deadline - patience))
    return StartedServer(process, address, key.encode())


def server_key() -> bytes:
    key = os.environ.get(KEY_ENV)
    if not key:
        raise RolloutServerError(f"{KEY_ENV} is not set: a rollout server at rollout.server_address needs its "
                                 "key (the server command prints where it wrote it)")
    return key.encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpoflow.rollout.server")
    parser.add_argument("--spec", required=True, help="ServerSpec as JSON")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", help="where the address is written once the server listens")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rollout-server %(levelname)s %(message)s")
    if args.parent_pid is not None:  # the trainer's: Ctrl-C in its terminal is the trainer's to handle, it stops us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = ServerSpec(**json.loads(args.spec))
    return serve(spec, host=args.host, port=args.port, key=server_key(), ready_file=args.ready_file,
                 parent_pid=args.parent_pid, timeout=args.timeout)


def serve(spec: ServerSpec, *, host: str, port: int, key: bytes, ready_file: str | None = None,
          parent_pid: int | None = None, timeout: float = 600.0, on_ready: Callable[[str], None] | None = None) -> int:
    listener = Listener((host, port), authkey=key)
    server = RolloutServer(spec, listener, timeout=timeout)  # the engine loads before the address is given
    address = f"{host}:{listener.address[1]}"
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "stopping", True))
    if ready_file:
        partial = Path(ready_file + ".partial")
        partial.write_text(address)
        partial.replace(ready_file)
    if on_ready:
        on_ready(address)
    log.info("rollout server: %s engine for %s, listening on %s", server.engine.name, spec.model_path, address)
    server.serve(parent_pid)
    return 0


# -- helpers -------------------------------------------------------------------------------------


def _weights_group(host: str, port: int, rank: int, backend: str, timeout: float):
    import torch.distributed as torch_dist

    store = torch_dist.TCPStore(host, port, 2, False, timeout=datetime.timedelta(seconds=timeout))
    return _weights_group_on(store, rank, backend, timeout)


def _weights_group_on(store, rank: int, backend: str, timeout: float):
    """A process group of two (trainer rank 0, server rank 1), apart from any the trainer has."""
    import torch.distributed as torch_dist

    span = datetime.timedelta(seconds=timeout)
    if backend == "nccl":
        options = torch_dist.ProcessGroupNCCL.Options()
        options._timeout = span
        return torch_dist.ProcessGroupNCCL(store, rank, 2, options)
    return torch_dist.ProcessGroupGloo(store, rank, 2, span)


def _timed(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """fn() in a thread, waited for at most `timeout` s: a peer that stopped reading blocks a send."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RolloutServerError(f"the rollout server did not answer within rollout.server_timeout_s ({timeout:g} s) "
                                 f"while {what}")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (rollout.server_gpus indexes it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    return [v for v in visible.split(",") if v]


def _ipc_handle(tensor) -> tuple:
    """What another process on this card needs to map `tensor` (torch's own CUDA IPC reduction)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor.detach())
    return args


def _from_ipc(args: tuple):
    """The tensor an _ipc_handle names, mapped into this process, on this process's card (the
    trainer may number it differently: CUDA_VISIBLE_DEVICES)."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(args)
    args[6] = torch.cuda.current_device()  # storage_device
    return rebuild_cuda_tensor(*args)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_uuid() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _nap(seconds: float) -> list:
    time.sleep(seconds)
    return []


if __name__ == "__main__":
    sys.exit(main())
