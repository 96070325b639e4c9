"""Log-probs + GRPO loss, forward and backward, from hidden states: four implementations side by side.

    python benchmarks/kernel_speed.py --out /tmp/kernels            # on a GPU: the issue #7 shapes
    python benchmarks/kernel_speed.py --smoke --out /tmp/kernels    # tiny shapes, runs on the CPU too

For each (B*T, H, V), dtype and lm_head frozen (LoRA) or trained, in one process:
    naive    logits = hidden @ W.T as one [B*T, V] tensor, upcast to float32, kernels/reference.py's
             selective_log_softmax and grpo_loss: what the model's own forward leads to
    chunked  kernels/chunked.py (rows in chunks, pure torch) + the reference grpo_loss
    triton   kernels/triton_logps.py + kernels/triton_loss.py (grpo.kernels: triton)
    liger    Liger Kernel's LigerFusedLinearGRPOLoss (liger_kernel.chunked_loss), if installed
all computing the same loss (dapo, beta = 0.04 with reference log-probs, old log-probs, a mask of
random completion lengths). Reported: the median time of forward + backward over --repeats runs after
--warmup runs (Triton's autotuning and torch.compile happen there), the peak of allocated CUDA memory
above what was allocated before the call (the inputs), and the relative error of the loss and of the
gradients against naive's. Separately, for the fused paths, log-probs and d_hidden of --check-rows rows
against a float64 log-softmax (the tests' tolerances: rel <= 2e-2 for log-probs, 1e-2 for gradients).

Writes NAME.json and NAME.md (a markdown table) under --out (--name, default kernels), after every case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for benchmarks/

from benchmarks.common import device_or_exit, free_memory, versions  # noqa: E402

SHAPES = [(16, 1024, 2048, 151_936), (8, 4096, 4096, 128_256)]  # B, T, H, V: Qwen3-1.7B-, Llama-3-8B-like heads
SMOKE_SHAPES = [(2, 7, 16, 75)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("naive", "chunked", "triton", "liger")
LOSS = dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.04, temperature=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.json and NAME.md")
    parser.add_argument("--name", default="kernels", help="file names under --out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU (Triton interpreted)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--heads", nargs="+", choices=["frozen", "trained"], default=["frozen", "trained"])
    parser.add_argument("--shapes", nargs="+", type=int, default=None,
                        help="B T H V [B T H V ...] instead of the issue's shapes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-rows", type=int, default=128)
    parser.add_argument("--triton-chunk-mib", type=int, default=None,
                        help="a fixed d_logits chunk for the Triton backward (default: kernels/triton_logps.py's rule)")
    args = parser.parse_args()

    device = device_or_exit(args.smoke, "the full shapes need a GPU; --smoke runs tiny shapes on the CPU")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [tuple(args.shapes[i:i + 4]) for i in range(0, len(args.shapes), 4)]
    if args.triton_chunk_mib:
        from grpoflow.kernels import triton_logps

        triton_logps.CHUNK_BYTES_MIN = triton_logps.CHUNK_BYTES_MAX = args.triton_chunk_mib * 2**20
    methods = [m for m in args.methods if m != "liger" or _liger_available()]
    if "liger" in args.methods and "liger" not in methods:
        print("liger_kernel is not installed: skipping it", file=sys.stderr)

    report = {"card": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor()})",
              "date": datetime.date.today().isoformat(), "command": " ".join([sys.executable, *sys.argv]),
              "versions": versions("triton", "liger_kernel", "transformers"), "loss": LOSS, "triton_chunk_mib": args.triton_chunk_mib,
              "warmup": args.warmup, "repeats": args.repeats, "results": []}
    results = report["results"]
    args.out.mkdir(parents=True, exist_ok=True)
    for (B, T, H, V), dtype_name, head in [(s, d, h) for s in shapes for d in args.dtypes for h in args.heads]:
        case = dict(B=B, T=T, H=H, V=V, dtype=dtype_name, lm_head=head)
        print(f"== {case}", flush=True)
        inputs = _inputs(B, T, H, V, DTYPES[dtype_name], head == "trained", device)
        reference = None
        for method in methods:
            row = {**case, "method": method, **_measure(method, inputs, args.warmup, args.repeats, device)}
            grads = row.pop("_grads", None)
            if grads is not None and reference is None:
                reference = (method, grads)
            elif grads is not None:
                row["errors_vs"] = reference[0]
                row.update(_relative_errors(grads, reference[1]))
            if method in ("chunked", "triton") and "error" not in row:
                row.update(_check_against_float64(method, inputs, args.check_rows))
            print("   ", json.dumps({k: v for k, v in row.items() if k not in case}), flush=True)
            results.append(row)
        del inputs, reference
        free_memory()
        # after every case: a run cut short keeps what it measured
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{args.name}.md").write_text(_table(report))
    print(_table(report))


def _inputs(B, T, H, V, dtype, head_trained, device) -> dict:
    """Hidden states and lm_head at the scale of a trained model's (logits of a few units), targets,
    and a GRPO batch: completions of random lengths (at least half of T), old and reference log-probs
    near log(1/V) so the ratios sit on both sides of the clip band."""
    N = B * T
    hidden = torch.randn(N, H, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / math.sqrt(H)).to(dtype).requires_grad_(head_trained)
    targets = torch.randint(0, V, (N,), device=device)
    lengths = torch.randint((T + 1) // 2, T + 1, (B,), device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()  # [B, T]
    typical = -math.log(V) - 0.5
    old_logps = typical + torch.randn(B, T, device=device)  # [B, T]
    ref_logps = typical + torch.randn(B, T, device=device)  # [B, T]
    advantages = torch.randn(B, device=device)  # [B]
    return dict(B=B, T=T, hidden=hidden, weight=weight, targets=targets, mask=mask, old_logps=old_logps,
                ref_logps=ref_logps, advantages=advantages)


def _loss(method: str, x: dict, liger_module=None) -> torch.Tensor:
    B, T, hidden, weight, targets = x["B"], x["T"], x["hidden"], x["weight"], x["targets"]
    batch = (x["old_logps"], x["ref_logps"], x["advantages"], x["mask"])
    loss_args = dict(loss_type=LOSS["loss_type"], epsilon=LOSS["epsilon"], epsilon_high=LOSS["epsilon_high"],
                     beta=LOSS["beta"])
    if method == "naive":
        from grpoflow.kernels.reference import grpo_loss, selective_log_softmax

        logits = (hidden @ weight.T).float().view(B, T, -1)  # [B, T, V]
        if LOSS["temperature"] != 1.0:
            logits = logits / LOSS["temperature"]
        logps = selective_log_softmax(logits, targets.view(B, T))  # [B, T]
        return grpo_loss(logps, *batch, **loss_args)[0]
    if method == "chunked":
        from grpoflow.kernels.chunked import chunked_selective_logps
        from grpoflow.kernels.reference import grpo_loss

        logps, _ = chunked_selective_logps(hidden, weight, targets, temperature=LOSS["temperature"])  # [N]
        return grpo_loss(logps.view(B, T), *batch, **loss_args)[0]
    if method == "triton":
        from grpoflow.kernels.triton_logps import triton_selective_logps
        from grpoflow.kernels.triton_loss import triton_grpo_loss

        logps, _ = triton_selective_logps(hidden, weight, targets, temperature=LOSS["temperature"])  # [N]
        return triton_grpo_loss(logps.view(B, T), *batch, **loss_args)[0]
    # liger: hidden states [B, T, H] and ids [B, T]; the loss and its gradients come out of its forward
    old_logps, ref_logps, advantages, mask = batch
    loss, _metrics = liger_module(hidden.view(B, T, -1), weight, targets.view(B, T), mask, advantages,
                                  ref_per_token_logps=ref_logps, old_per_token_logps=old_logps)
    return loss


def _measure(method: str, x: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    liger_module = _liger_module(device) if method == "liger" else None
    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):
            _step(method, x, liger_module)
        free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        times = []
        for _ in range(repeats):
            x["hidden"].grad = x["weight"].grad = None
            _sync(device)
            start = time.perf_counter()
            loss = _step(method, x, liger_module)
            _sync(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    except torch.OutOfMemoryError as error:
        x["hidden"].grad = x["weight"].grad = None
        free_memory()
        return {"error": f"OutOfMemoryError: {str(error).splitlines()[0]}"}
    grads = {"loss": loss.detach().float().cpu().reshape(1), "d_hidden": x["hidden"].grad.float().cpu()}
    if x["weight"].requires_grad:
        grads["d_weight"] = x["weight"].grad.float().cpu()
    x["hidden"].grad = x["weight"].grad = None
    del liger_module
    free_memory()
    return {"median_ms": 1000 * statistics.median(times), "times_ms": [round(1000 * t, 3) for t in times],
            "peak_gib_above_inputs": peak, "_grads": grads}


def _step(method, x, liger_module):
    loss = _loss(method, x, liger_module)
    loss.backward()
    return loss


def _relative_errors(grads: dict, reference: dict) -> dict:
    return {f"rel_err_{name}": (float((grads[name] - reference[name]).norm() / reference[name].norm().clamp(min=1e-30)))
            for name in grads if name in reference}


def _check_against_float64(method: str, x: dict, rows: int) -> dict:
    """log-probs and d_hidden of the first `rows` rows against a float64 log-softmax."""
    hidden = x["hidden"][:rows].detach().requires_grad_()
    weight, targets = x["weight"].detach(), x["targets"][:rows]
    if method == "chunked":
        from grpoflow.kernels.chunked import chunked_selective_logps as selective_logps
    else:
        from grpoflow.kernels.triton_logps import triton_selective_logps as selective_logps
    logps, _ = selective_logps(hidden, weight, targets, temperature=LOSS["temperature"])
    (d_hidden,) = torch.autograd.grad(logps.sum(), hidden)

    h64 = hidden.detach().double()
    logits = torch.cat([h64 @ w.double().T for w in weight.split(16_384)], dim=1) / LOSS["temperature"]  # [rows, V]
    log_softmax = torch.log_softmax(logits, dim=-1)
    ref_logps = log_softmax.gather(1, targets[:, None]).squeeze(1)
    # d sum(logp) / d hidden_i = (onehot(target_i) - softmax_i) @ W / temperature
    d_logits = -log_softmax.exp()  # [rows, V]
    d_logits[torch.arange(len(targets)), targets] += 1.0
    ref_d_hidden = sum(d_logits[:, i:i + w.shape[0]] @ w.double()
                       for i, w in zip(range(0, weight.shape[0], 16_384), weight.split(16_384)))  # [rows, H]
    ref_d_hidden = ref_d_hidden / LOSS["temperature"]
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    out = {"f64_logps_max_abs_err": float((logps.double() - ref_logps).abs().max()),
           "f64_logps_rel_err": rel(logps, ref_logps), "f64_d_hidden_rel_err": rel(d_hidden, ref_d_hidden)}
    out["f64_within_tolerance"] = out["f64_logps_rel_err"] <= 2e-2 and out["f64_d_hidden_rel_err"] <= 1e-2
    return out


def _liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True


def _liger_module(device: torch.device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # its defaults otherwise: chunk_size=1 (one completion at a time), torch.compile of the loss math on CUDA
    return LigerFusedLinearGRPOLoss(beta=LOSS["beta"], use_ref_model=True, loss_type=LOSS["loss_type"],
                                    epsilon_low=LOSS["epsilon"], epsilon_high=LOSS["epsilon_high"],
                                    temperature=LOSS["temperature"], compiled=device.type == "cuda")


def _table(report: dict) -> str:
    lines = [f"{report['card']}, {report['date']}, median of {report['repeats']} forward+backward runs after "
             f"{report['warmup']} warm-up runs; peak = allocated CUDA memory above the inputs.", "",
             f"`{report['command']}`", "",
             "| B x T | H | V | dtype | lm_head | method | median ms | peak GiB | time / naive | peak / naive "
             "| rel err loss | rel err d_hidden | rel err d_W | float64 check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    naive = {(r["B"], r["T"], r["H"], r["V"], r["dtype"], r["lm_head"]): r for r in report["results"]
             if r["method"] == "naive" and "error" not in r}
    for r in report["results"]:
        key = (r["B"], r["T"], r["H"], r["V"], r["dtype"], r["lm_head"])
        cells = [f"{r['B']} x {r['T']}", str(r["H"]), str(r["V"]), r["dtype"], r["lm_head"], r["method"]]
        if "error" in r:
            lines.append("| " + " | ".join(cells + [r["error"][:60]] + [""] * 7) + " |")
            continue
        base = naive.get(key)
        peak = r["peak_gib_above_inputs"]
        time_ratio = f"{r['median_ms'] / base['median_ms']:.2f}" if base else "n/a"
        peak_ratio = f"{peak / base['peak_gib_above_inputs']:.3f}" if base and peak is not None else "n/a"
        check = ""
        if "f64_within_tolerance" in r:
            check = f"{'ok' if r['f64_within_tolerance'] else 'FAIL'} ({r['f64_logps_rel_err']:.1e}, " \
                    f"{r['f64_d_hidden_rel_err']:.1e})"
        cells += [f"{r['median_ms']:.1f}", "n/a" if peak is None else f"{peak:.3f}", time_ratio, peak_ratio,
                  _fmt(r.get("rel_err_loss")), _fmt(r.get("rel_err_d_hidden")), _fmt(r.get("rel_err_d_weight")), check]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.1e}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
