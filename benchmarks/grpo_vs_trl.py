"""GRPO step time and peak memory: grpoflow's trainer vs TRL's GRPOTrainer, same workload, same card.

Workload (the one issue #4 names): SmolLM2-135M-Instruct, GSM8K train prompts, 4 prompts x 8
completions x up to 256 new tokens a step through transformers generate, bf16, beta 0, loss
dapo, gradient checkpointing, full fine-tuning, the five GSM8K rewards. Both run N steps from
the same weights and prompts; the first step (warm-up, kernel compilation) is left out of the
median.

    python benchmarks/grpo_vs_trl.py --model /tmp/smollm2 --data /tmp/data --steps 10 --out $OUT
    python benchmarks/grpo_vs_trl.py ... --engine vllm --only ours --finetune lora --set rollout.share_weights=false --tag noshare
    python benchmarks/grpo_vs_trl.py ... --engine vllm --only trl --trl-server 1 --tag server   # TRL's vLLM server on GPU 1

Writes <out>/grpo_vs_trl[-only][-tag].json and prints a table. TRL is imported only for its half.
Each trainer is best run in a process of its own (--only): a colocated vLLM stays in its process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

WORKLOAD = dict(prompts=4, num_generations=8, max_completion_length=256, max_prompt_length=512,
                learning_rate=1e-6, seed=42)
VLLM_MEMORY = 0.3  # gpu_memory_utilization of the colocated vLLM, the same for both
REWARDS = ["correctness", "int", "strict_format", "soft_format", "xmlcount"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class DevicePeak:
    """Peak memory in use on the whole device (cudaMemGetInfo), polled every 20 ms: unlike torch's
    allocator statistics it sees vLLM's sleep-mode allocator and what it really gives back."""

    def __init__(self):
        import threading

        self.peak, self.stop_flag = 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop_flag.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def __enter__(self) -> "DevicePeak":
        if torch.cuda.is_available():
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


@contextlib.contextmanager
def profiled(on: bool, path: Path):
    """torch's profiler around the run (CPU and CUDA activity), its summary written to `path`: the
    trainer's phase ranges first, then the kernels with the most device time, then the calls with the
    most time on the host (a wait shows there: cudaStreamSynchronize, a copy to pageable memory). The
    timeline goes beside it as a gzipped Chrome trace (chrome://tracing, ui.perfetto.dev): where the
    generation's thread and the trainer's wait on each other, which a table cannot show; and the copies
    the card ran, each tied to the host call, thread and phase that launched it (trace_copies.py)."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    events = prof.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    phases = [e for e in events if e.key.startswith("grpoflow.")]
    lines = [f"{e.key}: {e.count} calls, CPU {e.cpu_time_total / 1e6:.3f} s, device "
             f"{getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)) / 1e6:.3f} s" for e in phases]
    host = ["", "by time on the host:", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    path.write_text("\n".join(["phases (wall time on the CPU side; the device time of the kernels they launched):",
                               *lines, "", events.table(sort_by=sort, row_limit=50), *host]) + "\n")
    trace = path.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    from benchmarks.trace_copies import copies, load_trace, phase_busy, table

    timeline = load_trace(trace)  # how busy each phase kept the card; what each copy was, and who asked
    path.with_suffix(".copies.txt").write_text(phase_busy(timeline) + "\n" + table(copies(timeline)))
    with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def run_ours(model: str, data: Path, steps: int, out: Path, kernels: str = "auto", engine: str = "hf",
             finetune: str = "full", overrides: list[str] = (), tag: str = "") -> dict:
    from benchmarks.common import drop_saved_models
    from grpoflow.config import _apply_override, validate_config
    from grpoflow.train.logps import resolve_kernels
    from stages.train import run_train

    w = WORKLOAD
    raw = {
        "rollout": {"engine": engine, "gpu_memory_utilization": VLLM_MEMORY},
        "model": {"finetune": finetune, "dtype": "bfloat16"},
        "grpo": {"max_steps": steps, "num_generations": w["num_generations"],
                 "per_device_train_batch_size": w["prompts"] * w["num_generations"],
                 "max_completion_length": w["max_completion_length"], "max_prompt_length": w["max_prompt_length"],
                 "learning_rate": w["learning_rate"], "seed": w["seed"], "beta": 0.0, "loss_type": "dapo",
                 "gradient_checkpointing": True, "reward_funcs": REWARDS, "warmup": {"enabled": False},
                 "kernels": kernels, "save_steps": 10_000, "output_dir": str(out / f"ours-{kernels}-{engine}-{finetune}-{tag}")}}
    for item in overrides:
        _apply_override(raw, item)
    cfg = validate_config(raw, "benchmark config")
    _reset_peak()
    result = run_train(cfg, data / "train.parquet", data / "heldout.parquet", model, progress=False)
    records = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    drop_saved_models(result.output_dir)
    return {"step_seconds": [r["step_seconds"] for r in records],
            "kernels": resolve_kernels(kernels, torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "peak_gib": max(r.get("memory/peak_gib", float("nan")) for r in records),
            # which phase sets the peak: generation, loss + backward, optimizer step
            "phase_peak_gib": {phase: max(r.get(f"memory/{phase}_peak_gib", float("nan")) for r in records)
                               for phase in ("generation", "train", "optimizer")},
            "completion_tokens": [r["completions/mean_length"] * w["prompts"] * w["num_generations"] for r in records],
            "reward": [r["reward"] for r in records],
            "generation_seconds": [r["generation/seconds"] for r in records],
            "generation_tokens_per_second": [r["generation/tokens_per_second"] for r in records],
            "time": {k: [r[k] for r in records] for k in ("time/weight_sync_seconds", "time/train_seconds",
                                                            "time/optimizer_seconds")},
            "train_tokens_per_second": [r["train/tokens_per_second"] for r in records],
            # rollout.mode async: how long each step waited for its generation, and how old its weights were
            "rollout_wait_seconds": [r.get("rollout/wait_seconds") for r in records],
            "rollout_staleness": [r.get("rollout/staleness") for r in records],
            "dynamic_sampling_groups_dropped": [r.get("dynamic_sampling/groups_dropped") for r in records],
            "frac_reward_zero_std": [r.get("frac_reward_zero_std") for r in records]}


class TRLServer:
    """TRL's `vllm-serve` (vLLM's own server, TRL 1.16) on a GPU of its own, for vllm_mode="server"."""

    def __init__(self, model: str, gpu: int, memory: float = 0.9, timeout: float = 900):
        import os
        import socket
        import subprocess
        import sys
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        self.process = subprocess.Popen([sys.executable, "-m", "trl.scripts.vllm_serve", "--model", model,
                                         "--host", "127.0.0.1", "--port", str(self.port),
                                         "--gpu_memory_utilization", str(memory)], env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"TRL's vllm-serve exited with {self.process.returncode} while starting")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"TRL's vllm-serve did not answer on {self.url} in {timeout:.0f} s") from None
                time.sleep(2)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except Exception:  # noqa: BLE001
            self.process.kill()


def run_trl(model: str, data: Path, steps: int, out: Path, engine: str = "hf", finetune: str = "full",
            sleep: bool = False, server_gpu: int | None = None) -> dict:
    import pyarrow.parquet as pq
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpoflow.rewards import load_reward

    w = WORKLOAD
    rows = pq.read_table(data / "train.parquet", columns=["prompt", "answer"]).to_pylist()
    dataset = Dataset.from_list(rows)
    funcs = []
    for name in REWARDS:
        fn = load_reward(name).fn

        def reward(prompts, completions, _fn=fn, **kw):
            return _fn(prompts=prompts, completions=completions, **kw)
        reward.__name__ = name
        funcs.append(reward)

    times: list[float] = []
    peaks: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            _reset_peak()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            times.append(time.perf_counter() - self.t)
            peaks.append(_peak_gib())

    server = TRLServer(model, server_gpu) if server_gpu is not None else None
    mode = {"vllm_mode": "server", "vllm_server_base_url": server.url} if server else {"vllm_mode": "colocate"}
    args = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=w["prompts"] * w["num_generations"],
        num_generations=w["num_generations"], max_completion_length=w["max_completion_length"],
        learning_rate=w["learning_rate"], seed=w["seed"], beta=0.0, loss_type="dapo", bf16=True,
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none",
        use_vllm=engine == "vllm" or server is not None, **mode, vllm_gpu_memory_utilization=VLLM_MEMORY,
        vllm_enable_sleep_mode=sleep, bf16_full_eval=False, use_cpu=not torch.cuda.is_available())
    peft_config = None
    if finetune == "lora":  # grpoflow's LoRA defaults
        from peft import LoraConfig

        from grpoflow.config import LoraConfig as Ours

        lora = Ours()
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset, callbacks=[Timer()],
                          peft_config=peft_config)
    try:
        trainer.train()
    finally:
        if server is not None:
            server.close()
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {"step_seconds": times, "peak_gib": max(peaks), "reward": rewards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face folder (SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, required=True, help="folder with train.parquet and heldout.parquet")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", choices=["ours", "trl"])
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="rollouts: transformers generate (hf) or colocated vLLM, for both trainers")
    parser.add_argument("--kernels", default="auto",
                        help="comma-separated grpo.kernels values to run ours with (auto, the trainer's default: "
                             "triton on a GPU, chunked on the CPU; chunked, triton, naive)")
    parser.add_argument("--prompts", type=int, default=WORKLOAD["prompts"], help="prompts a step (smoke tests: 1)")
    parser.add_argument("--max-completion-length", type=int, default=WORKLOAD["max_completion_length"])
    parser.add_argument("--finetune", choices=["full", "lora"], default="full", help="for both trainers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a grpoflow config override for ours, e.g. rollout.sleep=false (repeatable)")
    parser.add_argument("--trl-sleep", action="store_true", help="TRL with vllm_enable_sleep_mode (off by default)")
    parser.add_argument("--trl-server", type=int, default=None, metavar="GPU",
                        help="TRL with vllm_mode server: its vllm-serve on this GPU, the trainer on GPU 0")
    parser.add_argument("--tag", default="", help="appended to the output file name")
    parser.add_argument("--profile", action="store_true",
                        help="run under torch's profiler: <out>/profile-<name>.txt, the kernels by device time "
                             "and the trainer's phases (grpoflow.generation, .train, .sync, .optimizer)")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                        help="sys.setswitchinterval in this process (Python's default 0.005): how long a thread "
                             "waiting for the interpreter lock waits before it asks the holder to drop it")
    parser.add_argument("--sm-carveout", type=int, default=None, metavar="SMS",
                        help="matrix products leave this many SMs free (torch's experimental SM carveout, through "
                             "cuBLASLt, which this then prefers): does the generation ahead decode faster beside a "
                             "training pass whose products cannot fill the card")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.sm_carveout is not None:
        torch._C._set_sm_carveout_experimental(args.sm_carveout)  # cuBLASLt's SM count target, process-wide
        if torch.cuda.is_available():
            torch.backends.cuda.preferred_blas_library("cublaslt")  # plain cuBLAS products would ignore it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/
    from benchmarks.common import log_grpoflow

    log_grpoflow()
    WORKLOAD.update(prompts=args.prompts, max_completion_length=args.max_completion_length)
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"card": card, "workload": WORKLOAD, "steps": args.steps, "engine": args.engine,
               "finetune": args.finetune, "model": args.model, "overrides": args.overrides,
               "switch_interval": sys.getswitchinterval(), "sm_carveout": args.sm_carveout, "trl_sleep": args.trl_sleep,
               "trl_server_gpu": args.trl_server, "date": time.strftime("%Y-%m-%d")}
    runs = []
    if args.engine == "vllm" and (args.only is None or len(args.kernels.split(",")) > 1):
        # vLLM's sleep-mode allocator is one per process: a second engine fails at its start (H100,
        # 2026-12-06: the second of two --kernels values, after the first had run)
        parser.error("--engine vllm runs one trainer a process: pass --only and a single --kernels value "
                     "(benchmarks/vllm_gpu.sh starts each run as a process of its own)")
    if args.only in (None, "trl"):
        runs.append(("trl", lambda: run_trl(args.model, args.data, args.steps, args.out, args.engine, args.finetune,
                                            args.trl_sleep, args.trl_server)))
    if args.only in (None, "ours"):
        for kernels in args.kernels.split(","):
            runs.append((f"ours-{kernels}",
                         lambda k=kernels: run_ours(args.model, args.data, args.steps, args.out, k, args.engine,
                                                    args.finetune, args.overrides, args.tag)))
    name = "grpo_vs_trl" + (f"-{args.only}" if args.only else "") + (f"-{args.tag}" if args.tag else "")
    for run_name, fn in runs:
        with DevicePeak() as device, profiled(args.profile, args.out / f"profile-{name}-{run_name}.txt"):
            results[run_name] = fn()
        results[run_name]["device_peak_gib"] = device.gib
        results[run_name]["median_step_seconds"] = statistics.median(results[run_name]["step_seconds"][1:])
        (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")  # each run kept as it ends
        gc.collect()  # the previous trainer's model and optimizer must not count in the next one's peak
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"\n{results['card']}, {args.steps} steps, median step time without step 1")
    print("| trainer | median step s | peak GiB (torch) | device peak GiB | step / TRL | peak / TRL |")
    print("|---|---|---|---|---|---|")
    trl = results.get("trl")
    for name, _ in runs:
        r = results[name]
        ratios = (f"{r['median_step_seconds'] / trl['median_step_seconds']:.2f} | {r['peak_gib'] / trl['peak_gib']:.2f}"
                  if trl else "- | -")
        print(f"| {name} | {r['median_step_seconds']:.2f} | {r['peak_gib']:.2f} | {r['device_peak_gib']:.2f} "
              f"| {ratios} |")


if __name__ == "__main__":
    main()
