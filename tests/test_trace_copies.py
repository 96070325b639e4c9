"""benchmarks/trace_copies.py: each copy the card ran in a torch profiler trace, tied to the host call,
thread and trainer phase that launched it. The CUDA half of a trace is written here by hand in the
layout torch's profiler gives (CUDA runtime calls and the card's copies matched by correlation id);
the host half also comes from a real profile on the CPU."""

import gzip
import json

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.trace_copies import ancestors, copies, load_trace, phase_busy, table


def span(cat, name, tid, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def launch(tid, ts, op, inner, correlation, **op_args):
    """op > inner > cudaMemcpyAsync, as an `.item()` or a `.to("cpu")` appears on the host."""
    return [span("cpu_op", op, tid, ts, 100, **op_args), span("cpu_op", inner, tid, ts + 10, 80),
            span("cuda_runtime", "cudaMemcpyAsync", tid, ts + 20, 60, correlation=correlation)]


def copy(name, correlation, nbytes, dur):
    return {"ph": "X", "cat": "gpu_memcpy", "name": name, "pid": 0, "tid": 7, "ts": 9000, "dur": dur,
            "args": {"correlation": correlation, "bytes": nbytes}}


def trace() -> list[dict]:
    """The trainer (thread 11) reads a scalar inside grpoflow.train; the rollout thread (12) copies
    tokens to pinned memory twice inside grpoflow.generation; a kernel between them is not a copy."""
    return [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 11, "args": {"name": "trainer"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 12, "args": {"name": "rollouts"}},
        span("user_annotation", "grpoflow.train", 11, 0, 1000),
        *launch(11, 100, "aten::item", "aten::_local_scalar_dense", 5, **{"Input Dims": [[]]}),
        span("user_annotation", "grpoflow.generation", 12, 0, 5000),
        *launch(12, 300, "aten::to", "aten::copy_", 6, **{"Input Dims": [[32]]}),
        *launch(12, 500, "aten::to", "aten::copy_", 7, **{"Input Dims": [[32]]}),
        span("cuda_runtime", "cudaLaunchKernel", 12, 700, 10, correlation=8),
        {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7, "ts": 9100, "dur": 50,
         "args": {"correlation": 8}},
        copy("Memcpy DtoH (Device -> Pageable)", 5, 4, 1500.0),
        copy("Memcpy DtoH (Device -> Pinned)", 6, 256, 10.0),
        copy("Memcpy DtoH (Device -> Pinned)", 7, 256, 12.0),
    ]


def test_each_copy_is_tied_to_its_host_call_thread_and_phase(tmp_path):
    path = tmp_path / "t.trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": trace()}).encode()))
    rows = copies(load_trace(path))
    assert sorted((r["kind"], r["thread"], r["phase"], r["call"], r["bytes"]) for r in rows) == [
        ("Memcpy DtoH (Device -> Pageable)", "trainer", "grpoflow.train", "aten::item > aten::_local_scalar_dense", 4),
        ("Memcpy DtoH (Device -> Pinned)", "rollouts", "grpoflow.generation", "aten::to > aten::copy_", 256),
        ("Memcpy DtoH (Device -> Pinned)", "rollouts", "grpoflow.generation", "aten::to > aten::copy_", 256),
    ]
    lines = table(rows).splitlines()
    assert lines[0] == "3 copies, 0.002 s of device time; by device time:"
    # the slowest group first, the two pinned copies one row: count, bytes each, device ms, ms each, share
    assert lines[3] == ("| Memcpy DtoH (Device -> Pageable) | trainer | grpoflow.train | aten::item > "
                        "aten::_local_scalar_dense | [[]] | 1 | 4 | 1.5 | 1.500 | 99% |")
    assert lines[4] == ("| Memcpy DtoH (Device -> Pinned) | rollouts | grpoflow.generation | aten::to > aten::copy_ "
                        "| [[32]] | 2 | 256 | 0.0 | 0.011 | 1% |")
    assert len(lines) == 5


def test_each_phase_has_its_wall_time_beside_the_device_time_it_launched():
    """train: 1 ms on the host, a 1.5 ms copy; generation: 5 ms on the host, two copies and a kernel,
    0.072 ms; the card was busy from 9.0 to 10.5 ms of the trace, all of its span."""
    assert phase_busy(trace()).splitlines() == [
        "| phase | ranges | wall s (host) | device s (its kernels and copies) | device / wall |",
        "|---|---|---|---|---|",
        "| grpoflow.generation | 1 | 0.005 | 0.000 | 0.01 |",
        "| grpoflow.train | 1 | 0.001 | 0.002 | 1.50 |",
        "the card was busy 0.002 s of the 0.002 s from its first device event to its last (100%)",
    ]
    gaps = trace() + [copy("Memcpy HtoD (Pageable -> Device)", 99, 8, 500.0) | {"ts": 20500}]
    assert phase_busy(gaps).splitlines()[-2:] == [
        "| - | 0 | 0.000 | 0.001 | - |",  # a copy whose launch the trace does not hold
        "the card was busy 0.002 s of the 0.012 s from its first device event to its last (17%)"]


def test_a_copy_whose_launch_is_not_in_the_trace_is_still_counted():
    """A trace cut at the profiler's window can hold a copy without its host call: counted, origin '?'."""
    rows = copies([copy("Memset (Device)", 99, 64, 3.0)])
    assert [(r["thread"], r["phase"], r["call"]) for r in rows] == [("?", "-", "?")]


def test_a_real_profile_nests_the_host_ops_in_their_phase(tmp_path):
    """torch's own trace on the CPU: the ranges and ops enclosing an op are found, outermost first; it
    ran nothing on a card, so there are no copies."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("grpoflow.train"):
            a = torch.randn(8, 8)
            (a @ a).sum().item()
    prof.export_chrome_trace(str(tmp_path / "t.json"))
    events = load_trace(tmp_path / "t.json")
    enclosing = ancestors(events)
    mm = next(e for e in events if e.get("name") == "aten::mm")
    assert [e["name"] for e in enclosing[id(mm)]] == ["grpoflow.train", "aten::matmul"]
    assert copies(events) == [] and table([]).startswith("0 copies, 0.000 s")
