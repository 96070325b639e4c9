"""What a generation in a thread contends for beside the trainer: the interpreter, the host's kernel
launches, or the card's SMs (issue #21: in async mode generation and training each ran at half speed).

A vLLM generation of the async benchmark's size (4 prompts x 8 completions x 256 tokens, every token
written) runs in a thread of its own on a stream of its own, as `rollout.mode: async` runs it, while
the main thread runs one load until it ends:
- alone: nothing;
- python: a pure-Python loop, no CUDA (the interpreter lock alone);
- graph: matrix products replayed from a CUDA graph, one launch a replay (the card's SMs alone);
- launches: a loop of small eager kernels (the host's launches and the lock, the card nearly idle);
- train: forward and backward of the model itself, in transformers, on a batch of the step's size.
Each load also runs alone, so both sides' slowdowns are in the table.

    python benchmarks/contention.py --model /tmp/qwen3r --out $OUT/bench

Writes <out>/contention[-tag].json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/
from benchmarks.grpo_vs_trl import VLLM_MEMORY, WORKLOAD  # noqa: E402

LOADS = ("alone", "python", "graph", "launches", "train")


def python_load() -> Callable[[], None]:
    def step() -> None:
        total = 0
        for i in range(20_000):  # about a millisecond of bytecode, the lock held throughout
            total += i * i

    return step


def graph_load(device: str) -> Callable[[], None]:
    """Eight 4096^3 bf16 products in one CUDA graph: about 1 ms of the whole card per replay, one launch."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    b, out = torch.randn_like(a), torch.empty_like(a)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.matmul(a, b, out=out)  # warm-up outside the capture (cuBLAS's workspace)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for _ in range(8):
            torch.matmul(a, b, out=out)

    def step() -> None:
        graph.replay()
        torch.cuda.current_stream().synchronize()  # waits with the lock released

    return step


def launches_load(device: str) -> Callable[[], None]:
    x = torch.ones(256, 256, device=device)

    def step() -> None:
        for _ in range(200):  # 200 tiny kernels: launch-bound
            x.mul_(1.0)
        if x.is_cuda:
            torch.cuda.current_stream().synchronize()

    return step


def train_load(model_path: str, device: str, rows: int, length: int) -> Callable[[], None]:
    """The training pass's shape: forward and backward of the model's blocks over rows x length tokens,
    gradient checkpointing as the benchmark's trainers use it (the head left out: the trainer's fused
    kernels never make its full logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).to(device)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device=device)

    def step() -> None:
        loss = model.model(input_ids=ids).last_hidden_state.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.current_stream().synchronize()

    return step


def beside(generate: Callable[[], float], load: Callable[[], None] | None, pool: ThreadPoolExecutor,
           limit: float = math.inf) -> dict:
    """One generation in the pool's thread; `load` stepped in this thread until it ends, or for `limit`
    seconds at most: a load that holds the interpreter lock may starve the generation for minutes (the
    first GPU call passed 200 s in its first loads; which one, unknown). Then the generation ends alone,
    and its seconds are a floor (`load_stopped`). Returns the generation's seconds and the load's steps
    a second meanwhile."""
    future = pool.submit(generate)
    steps, started = 0, time.perf_counter()
    while load is not None and not future.done() and time.perf_counter() - started < limit:
        load()
        steps += 1
    stepped = time.perf_counter() - started
    stopped = load is not None and not future.done()
    seconds = future.result()
    return {"generation_seconds": seconds, "load_steps_per_second": steps / stepped, "load_stopped": stopped}


def alone_rate(load: Callable[[], None], seconds: float) -> float:
    """The load's steps a second with nothing beside it, over about `seconds`."""
    load()  # warm
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        load()
        steps += 1
    return steps / (time.perf_counter() - started)


def measure(generate: Callable[[], float], loads: dict[str, Callable[[], None] | None], repeats: int,
            pool: ThreadPoolExecutor, kept: Callable[[dict], None] = lambda results: None,
            limit: float = math.inf) -> dict:
    """Per load: the median generation beside it, and the load's speed beside the generation against alone.
    Each load says when it starts and what it measured (a run cut off mid-way tells which load it was in),
    and `kept` gets the results so far as each load ends."""
    results = {}
    for name, load in loads.items():
        print(f"{name}: {repeats} generations beside it ...", flush=True)
        runs = [beside(generate, load, pool, limit) for _ in range(repeats)]
        gen = statistics.median(r["generation_seconds"] for r in runs)
        row = {"generation_seconds": [r["generation_seconds"] for r in runs], "median_generation_seconds": gen,
               "load_stopped": sum(r["load_stopped"] for r in runs)}
        if load is not None:
            row["load_alone_steps_per_second"] = alone_rate(load, gen)
            row["load_beside_steps_per_second"] = statistics.median(r["load_steps_per_second"] for r in runs)
        results[name] = row
        print(f"{name}: generation {gen:.3f} s (median)", flush=True)
        kept(results)
    return results


def table(results: dict) -> str:
    base = results["alone"]["median_generation_seconds"]
    lines = ["| load | generation s | generation / alone | load's speed beside / alone |", "|---|---|---|---|"]
    # ">": the load was stopped at --limit in most repeats, and the generation ended alone
    for name, row in results.items():
        load = (f"{row['load_beside_steps_per_second'] / row['load_alone_steps_per_second']:.2f}"
                if "load_alone_steps_per_second" in row else "-")
        seconds = row["median_generation_seconds"]
        floor = ">" if 2 * row.get("load_stopped", 0) > len(row["generation_seconds"]) else ""  # median a floor
        lines.append(f"| {name} | {floor}{seconds:.3f} | {floor}{seconds / base:.2f} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    parser.add_argument("--limit", type=float, default=20.0,
                        help="seconds a load runs beside one generation at most (then the generation ends alone)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    unknown = set(args.loads.split(",")) - set(LOADS)
    if unknown:  # before vLLM's minute of start-up
        parser.error(f"--loads: {', '.join(sorted(unknown))} not among {', '.join(LOADS)}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as in the trainer: in process
    from vllm import LLM, SamplingParams

    w = WORKLOAD
    length = w["max_completion_length"]
    from grpoflow.private_api import pin_vllm_main_stream

    pool = ThreadPoolExecutor(1, thread_name_prefix="generation")
    llm = LLM(model=args.model, dtype="bfloat16", seed=w["seed"], gpu_memory_utilization=VLLM_MEMORY,
              max_model_len=w["max_prompt_length"] + length, logprobs_mode="processed_logprobs", max_logprobs=0)
    stream = torch.cuda.Stream()  # the generation's, as rollout.mode async has one: vLLM's own (VLLMEngine.use_stream)
    pin_vllm_main_stream(llm, stream)
    params = SamplingParams(n=w["num_generations"], max_tokens=length, min_tokens=length, ignore_eos=True,
                            temperature=1.0, logprobs=0, detokenize=False, seed=w["seed"])
    prompts = [{"prompt_token_ids": list(range(100 + i, 200 + i))} for i in range(w["prompts"])]

    def generate() -> float:
        with torch.cuda.stream(stream):
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - started

    print(f"warm-up generation: {pool.submit(generate).result():.3f} s", flush=True)
    makers = {"python": python_load, "graph": lambda: graph_load("cuda"), "launches": lambda: launches_load("cuda"),
              "train": lambda: train_load(args.model, "cuda", w["prompts"] * w["num_generations"], 100 + length)}
    loads = {"alone": None} | {name: makers[name]() for name in args.loads.split(",") if name != "alone"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"contention{'-' + args.tag if args.tag else ''}.json"
    record = {"card": torch.cuda.get_device_name(), "model": args.model, "workload": w, "repeats": args.repeats,
              "date": time.strftime("%Y-%m-%d")}

    def kept(results: dict) -> None:  # the loads measured so far, as each ends
        path.write_text(json.dumps(record | {"loads": results}, indent=2))

    results = measure(generate, loads, args.repeats, pool, kept, args.limit)
    print(f"{record['card']}, {args.model}, median of {args.repeats}:\n" + table(results), end="")
    pool.shutdown()


if __name__ == "__main__":
    main()
