"""`grpoflow continuous` as a real process, stopped from outside: SIGKILL at seeded random points across
a round (data prep, GRPO steps, evaluation, gate, export) and a SIGTERM inside the GRPO steps, each
followed by a rerun, ends where an uninterrupted run ends (the same adapters, ledger, decisions and
champion), and no process the killed one started is left running."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from grpoflow.reaper import descendants
from grpoflow.rounds import Rounds
from tests.drops import continuous_setup

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("GRPOFLOW_KILL_SEED", "29"))


def setup(root: Path, model: Path) -> Path:
    # 3 steps of 4 prompts reach 12 rows: one round; generations of 2 prompts, so a step spans two
    return continuous_setup(root, model, drop_rows=12, grpo={
        "max_steps": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 1e-2},
        eval={"max_samples": 3, "max_new_tokens": 8}, orchestration={"retries": 0, "retry_delay_seconds": 0},
        min_new_rows=8)


def start(config: Path, api_url: str | None, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    log = (config.parent / "runs.log").open("a")
    return subprocess.Popen([sys.executable, "-m", "grpoflow.cli", "continuous", "--once", "-c", str(config)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen, sig: int, noted: dict[int, int]) -> None:
    """Signal the process; then every process it started must be gone within 10 s."""
    noted.update(descendants(process.pid))
    process.send_signal(sig)
    process.wait(timeout=120)
    deadline = time.monotonic() + 10
    while (left := _alive(noted)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running after the kill: {[_cmdline(p) for p in left]}"


def run_noting_children(process: subprocess.Popen, seconds: float) -> dict[int, int]:
    """Watch the process for `seconds` (or until it ends), noting every process it starts."""
    noted: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        noted.update(descendants(process.pid))
        time.sleep(0.05)
    return noted


def _alive(noted: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in noted.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[19]) == start and fields[0] != "Z":
            alive.append(pid)
    return alive


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return f"{pid} (gone)"


def phase(state: Path) -> str:
    """Where the round is, from what it has written so far."""
    r = Rounds(state).unfinished()
    done = [r for r in Rounds(state).all() if r.status == "done"]
    if r is None:
        return "round done" if done else "before the round opened"
    if r.status == "decided":
        return "after the gate"
    steps = sorted(p.name for p in (state / "train").glob("*/checkpoints/step-*"))
    if r.training is None:
        return f"GRPO, checkpoint {steps[-1] if steps else 'none yet'}"
    return "evaluation"


def outcome(state: Path) -> dict:
    every = Rounds(state).all()
    return {"rounds": [{"round": r.round, "rows": r.rows, "trained": r.training["rows_trained"], "steps": r.steps,
                        "status": r.status, "promoted": r.decision["promoted"],
                        "figures": (r.decision["champion"], r.decision["challenger"])} for r in every],
            "ledger": sorted(pq.read_table(state / "ledger.parquet").column("id").to_pylist()),
            "adapters": {r.round: load_file(Path(r.training["model"]) / "adapter_model.safetensors") for r in every}}


def test_kills_at_random_points_end_where_an_uninterrupted_run_ends(prefect_ui_server, tiny_model, tmp_path):
    a = setup(tmp_path / "a", tiny_model)
    began = time.monotonic()
    clean = start(a, prefect_ui_server, tmp_path / "home")
    assert clean.wait(timeout=600) == 0, (a.parent / "runs.log").read_text()[-3000:]
    seconds = time.monotonic() - began
    expected = outcome(a.parent / "state")
    assert expected["rounds"][0]["trained"] == 12 and len(expected["ledger"]) == 12

    # each trial from scratch: stopped once (the first twice), then run to the end
    rng = random.Random(SEED)
    trials = [[signal.SIGTERM]] + [[signal.SIGKILL, signal.SIGKILL]] + [[signal.SIGKILL]] * 4
    stops = []
    for n, signals in enumerate(trials):
        b = setup(tmp_path / f"b{n}", tiny_model)
        for sig in signals:
            stops.append(interrupt(b, sig, rng.uniform(2, seconds), prefect_ui_server, tmp_path / "home"))
        final = start(b, prefect_ui_server, tmp_path / "home")
        assert final.wait(timeout=600) == 0, (b.parent / "runs.log").read_text()[-3000:]
        got = outcome(b.parent / "state")
        assert got["rounds"] == expected["rounds"] and got["ledger"] == expected["ledger"], stops[-1]
        for k, weights in expected["adapters"].items():
            assert weights.keys() == got["adapters"][k].keys()
            assert all(torch.allclose(weights[w], got["adapters"][k][w], atol=1e-6) for w in weights), stops[-1]
        leftovers = list((b.parent / "state").rglob(".tmp-*"))
        assert not leftovers, leftovers
    print(f"seed {SEED}; uninterrupted {seconds:.0f} s; stops: {'; '.join(stops)}")


def interrupt(config: Path, sig: int, delay: float, api_url: str, home: Path) -> str:
    """Start a run and stop it with `sig`: SIGTERM once its first GRPO checkpoint is written, SIGKILL
    after `delay` seconds. Where it was stopped, for the test's output."""
    state = config.parent / "state"
    process = start(config, api_url, home)
    if sig == signal.SIGTERM:
        noted: dict[int, int] = {}
        while process.poll() is None and not list((state / "train").glob("*/checkpoints/step-*")):
            noted.update(run_noting_children(process, 0.2))
        at = "the first checkpoint"
    else:
        noted, at = run_noting_children(process, delay), f"{delay:.1f} s"
    if process.poll() is not None:
        return f"{signal.Signals(sig).name} at {at}: the run finished first"
    where = phase(state)
    stop(process, sig, noted)
    if sig == signal.SIGTERM:
        assert process.returncode == 0, (config.parent / "runs.log").read_text()[-3000:]
        assert "training stopped at step" in (config.parent / "runs.log").read_text()
    return f"{signal.Signals(sig).name} at {at} ({where}): exit {process.returncode}"


def test_a_killed_run_takes_its_temporary_prefect_server_with_it(tiny_model, tmp_path):
    config = setup(tmp_path, tiny_model)
    process = start(config, None, tmp_path / "home")  # no API URL: Prefect starts a server of its own
    noted: dict[int, int] = {}
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        noted.update(run_noting_children(process, 0.2))
        if any("uvicorn" in _cmdline(p) or "prefect" in _cmdline(p) for p in _alive(noted)):
            break
    assert process.poll() is None, (tmp_path / "runs.log").read_text()[-3000:]
    assert any("uvicorn" in _cmdline(p) or "prefect" in _cmdline(p) for p in _alive(noted))
    stop(process, signal.SIGKILL, noted)
