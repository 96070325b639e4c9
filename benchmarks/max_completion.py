"""The longest completion that fits on the card, in the trainer's loss path, per `grpo.kernels`.

    python benchmarks/max_completion.py --kernels naive triton --out /tmp/maxlen   # on a GPU
    python benchmarks/max_completion.py --smoke --out /tmp/maxlen                   # tiny, CPU too

A random-init Qwen3-0.6B-shaped model (hidden 1024, intermediate 3072, 28 layers, 16 heads, 8 KV
heads, head_dim 128, vocabulary 151,936, tied embeddings), its base in bfloat16 with grpoflow's
default LoRA adapters (r 16 on every linear of the blocks), gradient checkpointing on, train mode:
as grpoflow.train.policy.load_policy sets it up. One micro-step as stages/train.py runs it: 8
completions of L tokens after a 64-token prompt, grpoflow.train.logps.completion_logps (with
entropy) under bf16 autocast, the loss from grpoflow.train.logps.loss_function (dapo), backward.
No padding, so attention runs as plain causal SDPA (FlashAttention): what grows with L is then the
activations and, on the naive path, the [8, L, V] logits.

L doubles from --start until a step runs out of memory, then bisects between the last fit and the
first failure until they are --resolution tokens apart, or until the next try would end past
--budget seconds (its time guessed from the longest fitting try times the squared length ratio);
the bracket is reported either way. Each try starts from freed memory; torch.OutOfMemoryError is
caught. Writes max_completion-<kernels>.json under --out after every try, so a run cut short keeps
its tries, and runs for different kernels (separate calls) keep each other's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/

from benchmarks.common import QWEN3_0_6B, device_or_exit, free_memory, versions  # noqa: E402

SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=300, tie_word_embeddings=True)
# grpoflow's model.lora defaults (grpoflow/config.py LoraConfig); not imported, so that this runs without pydantic
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
PROMPT = 64
COMPLETIONS = 8
SMOKE_FITS = 11  # --smoke: longer completions raise torch.OutOfMemoryError before running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kernels", nargs="+", choices=["naive", "chunked", "triton"], default=["naive", "triton"])
    parser.add_argument("--start", type=int, default=1024, help="first completion length tried")
    parser.add_argument("--resolution", type=int, default=1024, help="stop bisecting when the bracket is this narrow")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for each kernels' search; a try that would end past it is not started")
    parser.add_argument("--max-length", type=int, default=1 << 20, help="never try longer than this")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU too, which pretends that only SMOKE_FITS tokens fit, so "
                             "that the doubling, the out-of-memory handling and the bisection all run")
    args = parser.parse_args()

    device = device_or_exit(args.smoke, "the search needs a GPU; --smoke runs a tiny model on the CPU")
    if args.smoke:
        args.start, args.resolution, args.max_length = 4, 1, 64

    model = _policy_model(SMOKE if args.smoke else QWEN3_0_6B, device, args.max_length + PROMPT)
    cuda = device.type == "cuda"
    report = {"card": torch.cuda.get_device_name() if cuda else "CPU",
              "card_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
              "date": datetime.date.today().isoformat(), "command": " ".join([sys.executable, *sys.argv]),
              "versions": versions("triton", "transformers", "peft"), "model": SMOKE if args.smoke else QWEN3_0_6B,
              "lora": LORA, "completions": COMPLETIONS, "prompt": PROMPT, "results": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for kernels in args.kernels:
        def progress(result: dict, kernels=kernels) -> None:  # after every try: a killed run keeps what it found
            report["results"][kernels] = result
            (args.out / f"max_completion-{'-'.join(args.kernels)}.json").write_text(json.dumps(report, indent=1) + "\n")

        result = _search(model, kernels, device, args, progress)
        progress(result)
        print(json.dumps({kernels: result}), flush=True)
    fits = {k: r["longest_fit"] for k, r in report["results"].items()}
    if fits.get("naive") and fits.get("triton"):
        report["triton_over_naive"] = fits["triton"] / fits["naive"]
    (args.out / f"max_completion-{'-'.join(args.kernels)}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"longest_fit": fits, "triton_over_naive": report.get("triton_over_naive")}))


def _policy_model(shape: dict, device: torch.device, max_positions: int):
    """The model as load_policy makes it for LoRA: base in the compute dtype, adapters float32,
    gradient checkpointing (non-reentrant), input grads on, train mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, max_position_embeddings=max(max_positions, 4096), use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    model.train()
    return model


def _step(model, kernels: str, length: int, device: torch.device) -> float | None:
    """One micro-step's loss and backward at completion length `length`; returns the peak GiB (CUDA)."""
    from grpoflow.train.logps import completion_logps, loss_function

    vocab = model.get_base_model().config.vocab_size
    input_ids = torch.randint(3, vocab, (COMPLETIONS, PROMPT + length), device=device)  # [G, P + L]
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones(COMPLETIONS, length, device=device)  # [G, L]
    advantages = torch.randn(COMPLETIONS, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logps, entropy = completion_logps(model, input_ids, attention_mask, length, temperature=1.0,
                                          with_entropy=True, kernels=kernels)  # [G, L]
    loss, _ = loss_function(kernels, device)(logps.float(), None, None, advantages, completion_mask,
                                             loss_type="dapo")
    loss.backward()
    del logps, entropy, loss
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _try(model, kernels: str, length: int, device: torch.device, smoke: bool) -> tuple[bool, float | None, float]:
    model.zero_grad(set_to_none=True)
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        if smoke and length > SMOKE_FITS:
            raise torch.OutOfMemoryError(f"--smoke pretends that only {SMOKE_FITS} tokens fit")
        peak = _step(model, kernels, length, device)
        ok = True
    except torch.OutOfMemoryError:
        peak, ok = None, False
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    free_memory()
    print(f"  {kernels} L={length}: {'fits' if ok else 'out of memory'}"
          f"{f', peak {peak:.1f} GiB' if peak else ''}, {seconds:.1f} s", flush=True)
    return ok, peak, seconds


def _search(model, kernels: str, device: torch.device, args, progress) -> dict:
    started = time.perf_counter()
    tries = []
    fit, fail = None, None  # longest length that fitted, shortest that did not

    def attempt(length: int) -> bool:
        ok, peak, seconds = _try(model, kernels, length, device, args.smoke)
        tries.append({"length": length, "fits": ok, "peak_gib": peak, "seconds": round(seconds, 2)})
        progress({"longest_fit": fit if not ok else max(fit or 0, length), "shortest_failure": fail if ok else length,
                  "note": "in progress", "tries": tries})
        return ok

    def out_of_time(length: int) -> bool:
        """Whether a try at `length` would end past the budget: the time of the longest try that fitted,
        scaled by the square of the length (causal attention's cost dominates at these lengths)."""
        done = [t for t in tries if t["fits"]]
        longest = max(done, key=lambda t: t["length"]) if done else None
        expected = longest["seconds"] * (length / longest["length"]) ** 2 if longest else 0.0
        return time.perf_counter() - started + expected > args.budget

    length = args.start
    while length <= args.max_length and not out_of_time(length):  # doubling
        if attempt(length):
            fit, length = length, length * 2
        else:
            fail = length
            break
    while fit and fail and fail - fit > args.resolution and not out_of_time((fit + fail) // 2):  # bisection
        middle = (fit + fail) // 2
        if attempt(middle):
            fit = middle
        else:
            fail = middle
    if fit is None and fail is not None:
        note = f"even --start {args.start} did not fit"
    elif fail is None:
        note = "fits at --max-length" if length > args.max_length else "the budget ended while doubling"
    elif fail - fit > args.resolution:
        note = "the budget ended while bisecting"
    else:
        note = f"bisected to {args.resolution} tokens"
    return {"longest_fit": fit, "shortest_failure": fail, "note": note, "tries": tries,
            "seconds": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    main()
