"""Where a profile's copies come from: every copy the card ran (memcpy, memset), tied to the host call
that launched it, its thread and the trainer's phase around it, from the Chrome trace torch's profiler
writes (`grpo_vs_trl.py --profile` writes one beside its table, and this table beside both).

    python benchmarks/trace_copies.py OUT/bench/profile-grpo_vs_trl-ours-qwen3r-profile-async-ours-auto.trace.json.gz

First each trainer phase's wall time against the device time of what it launched (a phase whose
device time is well under its wall time keeps the card waiting on the host). Then a table sorted by
device time: copy kind, launching thread, phase (the outermost `grpoflow.*` range), host call
(outermost and innermost op around the CUDA call), count, bytes each, device time. Without a
Python stack (`with_stack` crashed torch's profiler on the GPU machine) the ops and ranges are what
name a copy's origin: `aten::item` is a `.item()`, `aten::to` with pageable memory is a `.cpu()` or a
`.to("cpu")` without pinned memory, and the thread says whether the trainer or the rollout thread asked.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

HOST = {"cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver"}
COPIES = {"gpu_memcpy", "gpu_memset"}
DEVICE = COPIES | {"kernel"}


def load_trace(path: Path) -> list[dict]:
    """The trace's events; a .gz is read as it is written (gzip of the JSON)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def thread_names(events: list[dict]) -> dict[tuple, str]:
    return {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
            for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}


def ancestors(events: list[dict]) -> dict[int, list[dict]]:
    """For each host event (by id()), the host events of its thread that enclose it, outermost first: one
    sweep a thread, the events in start order, a stack of the ranges still open."""
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    enclosing = {}
    for spans in by_thread.values():
        spans.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        open_spans: list[dict] = []
        for e in spans:
            start = float(e["ts"])
            while open_spans and float(open_spans[-1]["ts"]) + float(open_spans[-1].get("dur", 0)) <= start:
                open_spans.pop()
            enclosing[id(e)] = list(open_spans)
            open_spans.append(e)
    return enclosing


def launches(events: list[dict]) -> dict:
    """CUDA runtime (or driver) calls by correlation id: the host side of each device event."""
    return {e["args"]["correlation"]: e for e in events if e.get("ph") == "X"
            and e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}


def phase_busy(events: list[dict]) -> str:
    """Per trainer phase (`grpoflow.*` range): its wall time on the host and the device time of the
    kernels and copies launched inside it. Device time well under wall time is a phase that keeps the
    card waiting on the host (launches, the interpreter lock) rather than one the card's speed bounds.
    Last, how busy the card was over the whole trace (the union of its device events)."""
    enclosing, launched = ancestors(events), launches(events)
    wall, device, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"].startswith("grpoflow."):
            wall[e["name"]] += float(e.get("dur", 0))
            count[e["name"]] += 1
    spans = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in DEVICE:
            continue
        spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
        call = launched.get(e.get("args", {}).get("correlation"))
        outer = [s["name"] for s in enclosing.get(id(call), []) if s["name"].startswith("grpoflow.")] if call else []
        device[outer[0] if outer else "-"] += float(e.get("dur", 0))
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    lines = ["| phase | ranges | wall s (host) | device s (its kernels and copies) | device / wall |",
             "|---|---|---|---|---|"]
    for name in sorted(set(wall) | set(device), key=lambda n: -wall.get(n, 0)):
        share = f"{device[name] / wall[name]:.2f}" if wall.get(name) else "-"
        lines.append(f"| {name} | {count.get(name, 0)} | {wall.get(name, 0) / 1e6:.3f} | {device[name] / 1e6:.3f} "
                     f"| {share} |")
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
    lines.append(f"the card was busy {busy / 1e6:.3f} s of the {span / 1e6:.3f} s from its first device event to its "
                 f"last ({100 * busy / span if span else 0:.0f}%)")
    return "\n".join(lines) + "\n"


def copies(events: list[dict]) -> list[dict]:
    """One row a copy the card ran: kind, bytes, device µs, and the host call that launched it (matched by
    the CUDA correlation id): its thread, phase and ops."""
    launched, enclosing, names = launches(events), ancestors(events), thread_names(events)
    rows = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in COPIES:
            continue
        call = launched.get(e.get("args", {}).get("correlation"))
        stack = enclosing.get(id(call), []) if call is not None else []
        ops = [s for s in stack if s.get("cat") == "cpu_op"]
        outer_inner = " > ".join(dict.fromkeys(s["name"] for s in ops[:1] + ops[-1:]))
        phases = [s["name"] for s in stack if s["name"].startswith("grpoflow.")]
        rows.append({
            "kind": e["name"], "bytes": int(e.get("args", {}).get("bytes", 0)), "us": float(e.get("dur", 0)),
            "thread": names.get((call.get("pid"), call.get("tid")), str(call.get("tid"))) if call else "?",
            "phase": phases[0] if phases else "-",
            "call": outer_inner or (call["name"] if call else "?"),
            "shapes": str(ops[0].get("args", {}).get("Input Dims", "")) if ops else "",
        })
    return rows


def table(rows: list[dict], top: int = 40) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["thread"], r["phase"], r["call"], r["shapes"])].append(r)
    ranked = sorted(groups.items(), key=lambda kv: -sum(r["us"] for r in kv[1]))
    total = sum(r["us"] for r in rows) or 1.0
    lines = [f"{len(rows)} copies, {total / 1e6:.3f} s of device time; by device time:",
             "| copy | thread | phase | host call | shapes | count | bytes each | device ms | ms each | share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, thread, phase, call, shapes), group in ranked[:top]:
        us = sum(r["us"] for r in group)
        lines.append(f"| {kind} | {thread} | {phase} | {call} | {shapes} | {len(group)} "
                     f"| {statistics.median(r['bytes'] for r in group):,.0f} | {us / 1e3:.1f} "
                     f"| {us / 1e3 / len(group):.3f} | {100 * us / total:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="a Chrome trace from torch's profiler (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=40, help="rows of the table (default 40)")
    args = parser.parse_args()
    events = load_trace(args.trace)
    print(phase_busy(events) + "\n" + table(copies(events), args.top), end="")


if __name__ == "__main__":
    main()
