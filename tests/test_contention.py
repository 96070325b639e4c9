"""benchmarks/contention.py on the CPU: the loads step, a generation in the pool's thread is measured
beside each and each load beside it against alone, and the table says both; vLLM's half runs on the GPU."""

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.contention import beside, launches_load, measure, python_load, table, train_load

ROOT = Path(__file__).resolve().parent.parent


def test_each_load_is_measured_beside_a_generation_in_another_thread(tiny_model):
    pool = ThreadPoolExecutor(1)
    threads = []

    def generate() -> float:  # a stand-in generation: a little Python, in the pool's thread
        threads.append(threading.current_thread().name)
        started = time.perf_counter()
        sum(i * i for i in range(200_000))
        return time.perf_counter() - started

    loads = {"alone": None, "python": python_load(), "launches": launches_load("cpu"),
             "train": train_load(str(tiny_model), "cpu", rows=2, length=8)}
    snapshots = []
    results = measure(generate, loads, repeats=2, pool=pool, kept=lambda so_far: snapshots.append(list(so_far)))
    assert list(results) == ["alone", "python", "launches", "train"]
    assert snapshots == [["alone"], ["alone", "python"], ["alone", "python", "launches"], list(results)]
    assert all(len(r["generation_seconds"]) == 2 and r["median_generation_seconds"] > 0 for r in results.values())
    assert "load_alone_steps_per_second" not in results["alone"]
    assert all(results[n]["load_alone_steps_per_second"] > 0 and results[n]["load_beside_steps_per_second"] > 0
               for n in ("python", "launches", "train"))
    assert set(threads) == {pool.submit(lambda: threading.current_thread().name).result()}
    lines = table(results).splitlines()
    assert lines[0] == "| load | generation s | generation / alone | load's speed beside / alone |"
    assert lines[2].startswith("| alone | ") and lines[2].endswith(" | 1.00 | - |")
    assert len(lines) == 6
    pool.shutdown()


def test_a_load_beside_nothing_steps_not_at_all():
    pool = ThreadPoolExecutor(1)
    assert beside(lambda: 0.25, None, pool) == {"generation_seconds": 0.25, "load_steps_per_second": 0.0,
                                                "load_stopped": False}
    pool.shutdown()


def test_a_load_past_the_limit_stops_and_the_generation_ends_alone():
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    ticks = []

    def generate() -> float:  # ends only once the load has stopped: a generation the load starves
        started = time.perf_counter()
        release.wait(10)
        return time.perf_counter() - started

    def load() -> None:
        ticks.append(time.perf_counter())
        time.sleep(0.01)

    started = time.perf_counter()
    timer = threading.Timer(0.6, release.set)  # the generation ends 0.6 s in, well after the 0.2 s limit
    timer.start()
    row = beside(generate, load, pool, limit=0.2)
    assert row["load_stopped"] and row["generation_seconds"] >= 0.55
    assert ticks and max(ticks) - started < 0.35  # the load stepped only until the limit
    results = {"alone": {"generation_seconds": [0.5], "median_generation_seconds": 0.5, "load_stopped": 0},
               "python": {"generation_seconds": [row["generation_seconds"]] * 3,
                          "median_generation_seconds": row["generation_seconds"], "load_stopped": 2,
                          "load_alone_steps_per_second": 100.0, "load_beside_steps_per_second": 50.0}}
    assert table(results).splitlines()[3].startswith("| python | >0.")  # a floor, said so
    pool.shutdown()


def test_an_unknown_load_is_refused_before_vllm_starts():
    done = subprocess.run([sys.executable, "benchmarks/contention.py", "--model", "m", "--out", "o",
                           "--loads", "python,nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--loads: nope not among alone, python, graph, launches, train" in done.stderr
