"""Long completions end to end: one prompt x 8 completions of L tokens, whole GRPO steps (generation,
sync, log-probs, loss, backward, optimizer), the device memory of the whole process (issue #22).

    python benchmarks/long_context.py model --shape llama3-8b --tokenizer /tmp/smollm2 --out /tmp/llama8b
    python benchmarks/long_context.py model --shape qwen3-32b --tokenizer /tmp/smollm2 --out /tmp/qwen32b --sparse
    python benchmarks/long_context.py run --model /tmp/llama8b --finetune lora --length 20000 --out $OUT
    python benchmarks/long_context.py run --model /tmp/llama8b --finetune lora --length 20000 --trainer trl --out $OUT
    python benchmarks/long_context.py bisect --model /tmp/llama8b --finetune qlora --cap-gib 80 \\
        --low 32768 --high 65536 --out $OUT
    python benchmarks/long_context.py run --model /tmp/llama8b --finetune qlora --length 49152 --cap-gib 80 \\
        --decoded 64 --out $OUT                                         # memory only, see --decoded
    python benchmarks/long_context.py smoke --out /tmp/long-context      # a tiny shape on the CPU, same code

`model` saves a randomly initialised model of a real shape (the Hub is out of reach; random weights
are what speed and memory need) with another model's tokenizer: sampled ids above its vocabulary
decode to nothing, and lengths are what count. --sparse makes no weights: norms one, every other
tensor zeros written as holes of a sparse file (no disk), for memory-only runs of a shape too big for
the disk. Completions are forced to L tokens (rollout.ignore_eos), so every step does the same work.

Memory is the card's, as cudaMemGetInfo sees it, polled every 20 ms through the whole run: vLLM's
pool, the CUDA context and torch's allocator together, not torch's statistics alone. --cap-gib
holds the process to less than the card: vLLM's share (rollout.gpu_memory_utilization) is sized
against the cap, torch's allocator gets the cap as its memory fraction (vLLM's weights and KV cache
are allocated through it too, so the fraction holds both sides), and a run whose peak, CUDA context
and libraries' workspaces included, passes the cap counts as not fitting. Each run is a process of
its own (one vLLM engine per process); `bisect` starts them and keeps every try in
<out>/long_context-bisect-<tag>.json.

--decoded N measures memory only, where decoding every token would not fit the time there is (an
8B decodes 8 completions at 11.5 ms a token on an H100, so 47,500 tokens take 9 minutes): vLLM
decodes N tokens of each completion, and they are repeated, with their log-probs, to the full
length, for ours and TRL alike (both call vllm.LLM.generate). The memory is the full-length run's:
vLLM allocates the KV cache of every completion at full length when it starts, whatever it then
decodes, and the training pass gets completions of full length. The step's time is not.

Ours: LoRA r16 on every linear of the blocks (or QLoRA nf4, or full), bf16, gradient checkpointing,
grpo.kernels triton, loss dapo, beta 0, grpo.max_tokens_per_forward and grpo.offload_activations as
given. TRL 1.16 (--trainer trl): GRPOTrainer, vLLM colocate at the same share, the same LoRA,
gradient checkpointing, bf16, ignore_eos through its generation_kwargs.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/

from benchmarks.common import QWEN3_0_6B, drop_saved_models, log_grpoflow, versions  # noqa: E402
from benchmarks.grpo_vs_trl import DevicePeak  # noqa: E402

GIB = 2**30
# the shapes the issue names; vocabulary as the real models have it (the loss path's width)
SHAPES = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=128, vocab_size=128_256, tie_word_embeddings=False,
                                rope_theta=500_000.0, max_position_embeddings=131_072)),
    "qwen3-32b": ("qwen3", dict(hidden_size=5120, intermediate_size=25_600, num_hidden_layers=64, num_attention_heads=64,
                                num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=False,
                                rope_theta=1_000_000.0, max_position_embeddings=131_072)),
    "qwen3-0.6b": ("qwen3", dict(QWEN3_0_6B, rope_theta=1_000_000.0, max_position_embeddings=131_072)),
    "tiny": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=49_152, tie_word_embeddings=True,
                           max_position_embeddings=4096)),
}
PROMPT = "Think about this for as long as you can, then answer."
GENERATIONS = 8
PROMPT_TOKENS = 128  # vLLM's max_model_len: the prompt (64 at most) and its chat template, and the completion


def save_model(shape: str, tokenizer_dir: str, out: Path, sparse: bool = False) -> None:
    """A random model of `shape` in bfloat16, with the tokenizer of `tokenizer_dir`, made on the GPU if any
    (the 32B shape: 61 GiB on disk, more than a 1-GPU machine's 64 GiB disk holds with the rest).
    sparse: no weights made at all, the checkpoint written as holes (save_sparse)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    family, dims = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config, cls = ((LlamaConfig(**dims, **ids), LlamaForCausalLM) if family == "llama"
                   else (Qwen3Config(**dims, **ids), Qwen3ForCausalLM))
    started = time.perf_counter()
    if sparse:
        n = save_sparse(config, cls, out)
        tokenizer.save_pretrained(out)
        used = sum(f.stat().st_blocks * 512 for f in out.iterdir()) / GIB
        print(f"{out}: {shape}, {n / 1e9:.2f}B parameters, matrices zero (holes: {used:.3f} GiB on disk), "
              f"written in {time.perf_counter() - started:.0f} s")
        return
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16: the 32B shape in float32 (131 GB) fits no card
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {shape}, {n / 1e9:.2f}B parameters, random weights, saved in {time.perf_counter() - started:.0f} s")


def save_sparse(config, cls, out: Path) -> int:
    """`config`'s checkpoint as one safetensors file without making the model: norms ones, every other
    tensor zeros left as holes of a sparse file, which take no disk (the 32B shape: 61 GiB read, a few MB
    stored). For memory-only runs (--decoded): memory does not depend on the weights' values, while a
    model of zeros samples uniformly and learns nothing, so its times and rewards mean nothing.
    Returns the parameter count."""
    with torch.device("meta"):  # names and shapes only; a tied head is one parameter, saved once
        names = [(name, tuple(t.shape)) for name, t in cls(config).named_parameters()]
    header, size = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in names:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [size, size + 2 * math.prod(shape)]}
        size += 2 * math.prod(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data 8-byte aligned
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = f.tell()
        for name, shape in names:
            if name.endswith("norm.weight"):  # RMSNorm scales start at one
                f.seek(start + header[name]["data_offsets"][0])
                f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        f.truncate(start + size)
    config.dtype, config.architectures = torch.bfloat16, [cls.__name__]  # vLLM finds its model class by the latter
    config.save_pretrained(out)
    return sum(math.prod(shape) for _, shape in names)


def write_data(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"{PROMPT} ({i})"}], "question": PROMPT,
             "answer": "1", "solution": None, "origin": f"bench:{i}", "metadata": None} for i in range(64)]
    for name in ("train", "heldout"):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    return folder


def vllm_gib_for(model: str, length: int, quantized: bool, kv_cache_dtype: str = "auto") -> float:
    """vLLM's share that holds its weights and all GENERATIONS completions' KV cache at once (less,
    and vLLM would run part of them and hold the rest back, or recompute them): what
    rollout.gpu_memory_utilization auto asks for (grpoflow/rollout/sizing.py), in GiB."""
    from grpoflow.rollout.sizing import GIB, vllm_need

    config = json.loads((Path(model) / "config.json").read_text())
    need = vllm_need(config, sequences=GENERATIONS, max_model_len=PROMPT_TOKENS + length, quantized=quantized,
                     kv_cache_dtype=kv_cache_dtype)
    return round(need.total / GIB, 1)


def shares(cap_gib: float | None, vllm_gib: float, total_gib: float | None = None) -> tuple[float, float | None]:
    """vLLM's gpu_memory_utilization for vllm_gib, and torch's memory fraction under the cap (None: no cap).

    The fraction is the whole cap, not what vLLM leaves of it: vLLM allocates its weights and KV cache
    through torch's allocator in this process, so they count against the fraction too (the cap's
    remainder alone stopped vLLM from starting, H100, 2026-12-06)."""
    if total_gib is None:
        total_gib = torch.cuda.mem_get_info()[1] / GIB if torch.cuda.is_available() else 80.0
    if cap_gib is not None and vllm_gib >= cap_gib:
        raise RuntimeError(f"out of memory under --cap-gib {cap_gib}: vLLM's share alone takes {vllm_gib} GiB "
                           f"(weights and every completion's KV cache), nothing is left for training")
    return vllm_gib / total_gib, (None if cap_gib is None else min(1.0, cap_gib / total_gib))


def decode_only(decoded: int, length: int) -> None:
    """--decoded: every vllm.LLM.generate in this process decodes `decoded` tokens a completion, then
    repeats them, with their log-probs, to `length` tokens (completions are forced to their length)."""
    import vllm

    generate = vllm.LLM.generate

    def shortened(params):
        params = params.clone()
        params.max_tokens, params.min_tokens = decoded, min(params.min_tokens, decoded)
        return params

    def generate_then_repeat(self, prompts, sampling_params=None, *args, **kwargs):
        if sampling_params is not None:
            sampling_params = ([shortened(p) for p in sampling_params] if isinstance(sampling_params, list)
                               else shortened(sampling_params))
        outputs = generate(self, prompts, sampling_params, *args, **kwargs)
        for request in outputs:
            for completion in request.outputs:
                repeat_to(completion, length)
        return outputs

    vllm.LLM.generate = generate_then_repeat


def repeat_to(completion, length: int) -> None:
    """A vLLM CompletionOutput's tokens, and log-probs if any (a list of {token: Logprob} a position, or
    vLLM's FlatLogprobs, which appends the same way), repeated in turn up to `length`."""
    decoded = len(completion.token_ids)
    completion.token_ids = [completion.token_ids[i % decoded] for i in range(length)]
    if completion.logprobs is not None:
        for i in range(decoded, length):
            completion.logprobs.append(completion.logprobs[i % decoded])


def run_ours(args, data: Path) -> dict:
    from grpoflow.config import _apply_override, validate_config
    from stages.train import run_train

    cuda = torch.cuda.is_available()
    utilization, fraction = shares(args.cap_gib, args.vllm_gib)
    if fraction is not None and cuda:
        torch.cuda.set_per_process_memory_fraction(fraction)
    raw = {
        "model": {"finetune": args.finetune, "dtype": "bfloat16" if cuda else "float32"},
        "rollout": {"engine": "vllm" if cuda and not args.hf else "hf", "gpu_memory_utilization": utilization,
                    "ignore_eos": True, "max_model_len": PROMPT_TOKENS + args.length,
                    "kv_cache_dtype": args.kv_cache_dtype},
        "grpo": {"max_steps": args.steps, "num_generations": GENERATIONS, "per_device_train_batch_size": GENERATIONS,
                 "max_completion_length": args.length, "max_prompt_length": 64, "learning_rate": 1e-6,
                 "loss_type": "dapo", "beta": 0.0, "gradient_checkpointing": True,
                 "kernels": "triton" if cuda else "chunked", "reward_funcs": ["xmlcount"],
                 "warmup": {"enabled": False}, "save_steps": 100_000, "max_nonfinite_steps": 100,
                 "offload_activations": args.offload, "max_tokens_per_forward": args.max_tokens_per_forward,
                 "output_dir": str(args.out / f"ours-{args.tag}")}}
    for item in args.set:
        _apply_override(raw, item)
    cfg = validate_config(raw, "long-context benchmark")
    result = run_train(cfg, data / "train.parquet", data / "heldout.parquet", args.model, progress=False)
    records = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()
               if '"step"' in line and '"loss"' in line]
    drop_saved_models(result.output_dir)
    keep = ("step_seconds", "generation/seconds", "time/weight_sync_seconds", "time/train_seconds",
            "time/optimizer_seconds", "completions/mean_length", "memory/peak_gib", "memory/reserved_peak_gib",
            "memory/generation_peak_gib", "memory/train_peak_gib", "memory/train_transient_gib", "memory/weights_gib",
            "memory/trainable_gib", "memory/optimizer_gib", "memory/vllm_gib")
    return {"steps": [{k: r.get(k) for k in keep} for r in records],
            "config": {"vllm_utilization": utilization, "torch_fraction": fraction}}


def run_trl(args, data: Path) -> dict:
    import pyarrow.parquet as pq
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    utilization, fraction = shares(args.cap_gib, args.vllm_gib)
    if fraction is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)
    dataset = Dataset.from_list(pq.read_table(data / "train.parquet", columns=["prompt"]).to_pylist())
    config = GRPOConfig(
        output_dir=str(args.out / f"trl-{args.tag}"), max_steps=args.steps, per_device_train_batch_size=GENERATIONS,
        num_generations=GENERATIONS, max_completion_length=args.length, learning_rate=1e-6, beta=0.0,
        loss_type="dapo", bf16=True, gradient_checkpointing=True, logging_steps=1, save_strategy="no",
        report_to="none", use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=utilization,
        vllm_enable_sleep_mode=True, vllm_max_model_length=PROMPT_TOKENS + args.length,
        generation_kwargs={"ignore_eos": True})
    lora = None if args.finetune == "full" else LoraConfig(
        r=16, lora_alpha=32, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model_kwargs = {}
    if args.finetune == "qlora":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_compute_dtype=torch.bfloat16)
    config.model_init_kwargs = {"dtype": torch.bfloat16, **model_kwargs}
    times = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    def length_reward(completions, **_):
        return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    trainer = GRPOTrainer(model=args.model, reward_funcs=[length_reward], args=config, train_dataset=dataset,
                          peft_config=lora, callbacks=[Timer()])
    trainer.train()
    return {"steps": [{"step_seconds": t} for t in times]}


def run(args) -> dict:
    """One process, one trainer, one length; the result whatever happens (an out-of-memory included)."""
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_data(args.out / "data")
    if args.decoded:
        decode_only(args.decoded, args.length)
    record = {"trainer": args.trainer, "model": args.model, "finetune": args.finetune, "length": args.length,
              "decoded": args.decoded,  # not None: memory only, the step's time is not the full-length one
              "generations": GENERATIONS, "steps_asked": args.steps, "cap_gib": args.cap_gib, "vllm_gib": args.vllm_gib,
              "offload_activations": args.offload, "max_tokens_per_forward": args.max_tokens_per_forward,
              "kv_cache_dtype": args.kv_cache_dtype,
              "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": time.strftime("%Y-%m-%d"), "versions": versions("transformers", "peft", "vllm", "trl")}
    started = time.perf_counter()
    with DevicePeak() as device:
        try:
            record.update(run_ours(args, data) if args.trainer == "ours" else run_trl(args, data))
            record["status"] = "ok"
        except Exception as e:  # an out-of-memory or a refusal is a result here, said as it came
            record["status"] = "out_of_memory" if "out of" in str(e).lower() and "memory" in str(e).lower() else "error"
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
    record["device_peak_gib"] = device.gib
    record["seconds"] = time.perf_counter() - started
    if record["status"] == "ok" and args.cap_gib is not None and device.gib > args.cap_gib:
        record["status"] = "over_cap"
    path = args.out / f"long_context-{args.trainer}-{args.tag}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record.get(k) for k in ("trainer", "finetune", "length", "decoded", "status",
                                                 "device_peak_gib", "seconds", "error")}))
    return record


def bisect(args) -> None:
    """The longest length in [low, high] that runs within the cap, to --resolution tokens; every try
    is a process of its own, and is kept."""
    tries, low, high = [], args.low, args.high
    out = args.out / f"long_context-bisect-{args.trainer}-{args.tag}.json"
    fits = None
    while high - low > args.resolution or fits is None:
        length = high if fits is None else (low + high) // 2
        command = [sys.executable, __file__, "run", "--model", args.model, "--finetune", args.finetune,
                   "--trainer", args.trainer, "--length", str(length), "--steps", str(args.steps),
                   "--kv-cache-dtype", args.kv_cache_dtype, "--out", str(args.out), "--tag", f"{args.tag}-{length}"]
        command += ["--vllm-gib", str(args.vllm_gib)] if args.vllm_gib is not None else []  # else sized to the length
        command += ["--cap-gib", str(args.cap_gib)] if args.cap_gib is not None else []
        command += ["--offload"] if args.offload else []
        command += ["--max-tokens-per-forward", str(args.max_tokens_per_forward)] if args.max_tokens_per_forward else []
        command += ["--decoded", str(args.decoded)] if args.decoded else []
        command += [part for kv in args.set for part in ("--set", kv)]
        subprocess.run(command, check=False)
        result_file = args.out / f"long_context-{args.trainer}-{args.tag}-{length}.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {"status": "crashed"}
        tries.append({"length": length, "status": result["status"], "device_peak_gib": result.get("device_peak_gib")})
        out.write_text(json.dumps({"low": low, "high": high, "tries": tries}, indent=2) + "\n")
        if fits is None and result["status"] == "ok":  # the top of the range fits: nothing to bisect
            low = high
            break
        fits = False if fits is None else fits
        if result["status"] == "ok":
            low = length
        else:
            high = length
    fitted = {t["length"] for t in tries if t["status"] == "ok"}
    if low == high:
        print(f"{args.trainer} {args.finetune}: {high} fits (the top of the range)")
    elif low in fitted:
        print(f"{args.trainer} {args.finetune}: fits {low} tokens x {GENERATIONS}; {high} does not")
    else:  # the bottom of the range is taken to fit, never tried: say so
        print(f"{args.trainer} {args.finetune}: {high} does not fit; {low}, the bottom of the range, was not tried")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("model", help="save a random model of a real shape")
    make.add_argument("--shape", choices=sorted(SHAPES), required=True)
    make.add_argument("--tokenizer", required=True)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--sparse", action="store_true",
                      help="matrices zero, written as holes of a sparse file (no disk): memory-only runs")
    for name in ("run", "bisect", "smoke"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        if name == "smoke":
            continue
        p.add_argument("--model", required=True)
        p.add_argument("--finetune", choices=["lora", "qlora", "full"], default="lora")
        p.add_argument("--trainer", choices=["ours", "trl"], default="ours")
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--vllm-gib", type=float,
                       help="vLLM's share of the card: weights (LoRA: shared with the trainer) and KV cache; default: "
                            "what holds the weights and every completion's KV cache at once (vllm_gib_for)")
        p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="rollout.kv_cache_dtype")
        p.add_argument("--cap-gib", type=float, help="hold the process to this much of the card (80: an H100)")
        p.add_argument("--offload", action="store_true", help="grpo.offload_activations")
        p.add_argument("--max-tokens-per-forward", type=int, help="grpo.max_tokens_per_forward")
        p.add_argument("--tag", default="")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more grpoflow config")
        p.add_argument("--hf", action="store_true", help="the transformers engine instead of vLLM")
        p.add_argument("--decoded", type=int, metavar="N",
                       help="memory only: vLLM decodes N tokens a completion, repeated to the full length")
        if name == "run":
            p.add_argument("--length", type=int, required=True)
        else:
            p.add_argument("--low", type=int, required=True)
            p.add_argument("--high", type=int, required=True)
            p.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    log_grpoflow()
    if args.command == "model":
        save_model(args.shape, args.tokenizer, args.out, sparse=args.sparse)
    elif args.command == "run":
        args.tag = args.tag or f"{args.finetune}-{args.length}"
        if args.vllm_gib is None:  # QLoRA: vLLM loads the same checkpoint in 4 bits (ours: rollout.quantization
            # auto; TRL 1.16 hands its model's bitsandbytes config to its vLLM, seen in its log on 2026-12-06)
            args.vllm_gib = vllm_gib_for(args.model, args.length, quantized=args.finetune == "qlora",
                                         kv_cache_dtype=args.kv_cache_dtype)
        run(args)
    elif args.command == "bisect":
        args.tag = args.tag or args.finetune
        bisect(args)
    else:  # the same code on a tiny shape with the transformers engine: what a CPU can check
        tokenizer = smoke_tokenizer(args.out / "tokenizer")
        save_model("tiny", tokenizer, args.out / "tiny-model")
        smoke = argparse.Namespace(model=str(args.out / "tiny-model"), finetune="lora", trainer="ours", steps=2,
                                   vllm_gib=1.0, kv_cache_dtype="auto", cap_gib=None, offload=True,
                                   max_tokens_per_forward=96, tag="smoke", set=[], hf=True, length=40, out=args.out,
                                   decoded=None)
        record = run(smoke)
        if record["status"] != "ok" or any(s["completions/mean_length"] != 40 for s in record["steps"]):
            sys.exit(f"smoke run failed: {record}")


def smoke_tokenizer(out: Path) -> str:
    """SmolLM2's tokenizer from the embedded GGUF, saved as a folder in `out` (what `model` copies)."""
    import importlib.util

    from transformers import AutoTokenizer

    from grpoflow.base_model import PACKAGED_MODELS

    packaged = PACKAGED_MODELS["smollm2-135m-instruct"]
    folder = importlib.util.find_spec(packaged.package).submodule_search_locations[0]
    AutoTokenizer.from_pretrained(folder, gguf_file=packaged.gguf_file).save_pretrained(out)
    return str(out)


if __name__ == "__main__":
    main()
