"""Training logs with no external service: JSONL per step, sampled completions, a reward plot.

TensorBoard or Weights & Biases join when `grpo.report_to` asks for them and they are installed.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from grpoflow.config import ConfigError
from grpoflow.jsonl import append_records, read_records, rewrite_records

log = logging.getLogger("grpoflow.train")

# Steps over which frac_reward_zero_std is watched; near 1 throughout means no learning signal.
ZERO_STD_WINDOW = 5
ZERO_STD_ALARM = 0.9


class RunLogger:
    """write=False (every process but rank 0 of a data-parallel run): history in memory, no files.

    metrics.jsonl holds a line per logged step (`history`) and, under grpo.eval_strategy, a line per
    evaluation (`eval_history`), its keys prefixed `eval_` as transformers logs them. `facts` join
    report.json (the best checkpoint, the evaluation plot)."""

    def __init__(self, folder: Path, *, resume_step: int, report_to: list[str], run_name: str, config: dict,
                 write: bool = True):
        self.folder = folder
        self.write = write
        self.metrics_path = folder / "metrics.jsonl"
        self.completions_path = folder / "completions.jsonl"
        self.history, self.eval_history, self.sinks = [], [], []
        self.facts: dict[str, Any] = {}
        if not write:
            return
        # a resumed run redoes the steps after its checkpoint: drop their old lines (and a torn last line)
        for path in (self.metrics_path, self.completions_path):
            _truncate_after(path, resume_step)
        records = read_records(self.metrics_path)
        self.history = [r for r in records if not is_eval_record(r)]
        self.eval_history = [r for r in records if is_eval_record(r)]
        self.sinks = [_sink(name, folder, run_name, config) for name in report_to]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.history.append(record)
        if not self.write:
            return
        append_records(self.metrics_path, [record])
        for sink in self.sinks:
            sink(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """metrics: `eval_`-prefixed figures; an interval is a [low, high] list (not sent to the sinks)."""
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.eval_history.append(record)
        if not self.write:
            return
        append_records(self.metrics_path, [record])
        scalars = {k: v for k, v in metrics.items() if _finite(v)}
        for sink in self.sinks:
            sink(step, scalars)

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        if not self.write:
            return
        append_records(self.completions_path, [{"step": step, **s} for s in samples])  # one write; each record whole

    def report(self, **facts: Any) -> dict[str, Any]:
        """report.json's content: `facts` (steps, the model...), the reward at the start and the end
        (`reward_windows`), the median step time, and where the logs are."""
        history = self.history
        plot = self.plot()
        return {**self.facts, **facts, **reward_windows(history),
                "step_seconds_median": float(np.median([r["step_seconds"] for r in history])) if history else None,
                "metrics": str(self.metrics_path), "plot": str(plot) if plot else None}

    def plot(self) -> Path | None:
        """reward.png: the total reward and each reward's mean against the step."""
        if not (self.history and self.write):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        ax.plot(steps, [r.get("reward") for r in self.history], label="reward", lw=2)
        for key in sorted({k for r in self.history for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
            ax.plot(steps, [r.get(key) for r in self.history], label=key.split("/")[1], lw=1, alpha=0.8)
        ax.set_xlabel("step")
        ax.set_title("rewards")
        ax.legend(fontsize=7)
        ax2.plot(steps, [r.get("frac_reward_zero_std") for r in self.history], label="frac_reward_zero_std")
        ax2.plot(steps, [r.get("completions/clipped_ratio") for r in self.history], label="completions clipped")
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_xlabel("step")
        ax2.set_title("signal and truncation")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        path = self.folder / "reward.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class StepMeter:
    """Where one optimizer step's time and memory went: seconds by part (`timed`), the tokens
    trained on, and the peak GPU memory of each phase (`end`: generation, train, optimizer), so
    that memory/peak_gib says how much and memory/<phase>_peak_gib which phase set it.

    engine: the rollout engine, if it can release memory (vLLM's sleep: `released_bytes()` and a
    `wakes` count). torch's statistics count vLLM's released memory as allocated still; a phase
    through which it stayed released (no wake between its start and end) has it taken out."""

    PARTS = {"sync": "time/weight_sync_seconds", "train": "time/train_seconds", "optimizer": "time/optimizer_seconds"}

    def __init__(self, device: torch.device, engine=None):
        self.started = time.perf_counter()
        self.cuda = device.type == "cuda"
        self.engine = engine if callable(getattr(engine, "released_bytes", None)) else None
        self.phase_start = self._released()  # (bytes released, wakes) when the current phase began
        self.seconds: dict[str, float] = defaultdict(float)
        self.train_tokens = 0
        self.peaks: dict[str, float] = {}
        self.reserved_peak = 0.0  # GiB torch's allocator held from the card at most: allocated, cached, fragments
        self.train_base: float | None = None  # GiB allocated when the step's training pass began
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        with torch.profiler.record_function(f"grpoflow.{part}"):  # a range in a profiler's trace, if one runs
            yield
        if part == "optimizer" and self.cuda:
            torch.cuda.synchronize()  # the optimizer's kernels are queued: time them here, not in the next phase
        self.seconds[part] += time.perf_counter() - started

    def training_starts(self) -> None:
        """Before a micro-batch's training pass: what is allocated already (weights, optimizer,
        the generation's tensors), so that what the pass adds is known."""
        if self.cuda and self.train_base is None:
            self.train_base = (torch.cuda.memory_allocated() - self._released()[0]) / 2**30

    def _released(self) -> tuple[int, int]:
        if not (self.cuda and self.engine):
            return 0, 0
        return self.engine.released_bytes(), self.engine.wakes

    def end(self, phase: str) -> None:
        if self.cuda:
            (start, wakes), (now, wakes_now) = self.phase_start, self._released()
            released = min(start, now) if wakes_now == wakes else 0  # released through the whole phase
            peak = (torch.cuda.max_memory_allocated() - released) / 2**30
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)
            self.reserved_peak = max(self.reserved_peak, (torch.cuda.max_memory_reserved() - released) / 2**30)
            torch.cuda.reset_peak_memory_stats()
            self.phase_start = (now, wakes_now)

    def metrics(self) -> dict[str, float]:
        train = self.seconds["train"]
        out = {"step_seconds": time.perf_counter() - self.started,
               "train/tokens_per_second": self.train_tokens / train if train else 0.0,
               # where the step's time went (generation/seconds: sampling, rewards, advantages)
               **{key: self.seconds[part] for part, key in self.PARTS.items()}}
        if self.peaks:
            out["memory/peak_gib"] = max(self.peaks.values())
            # what the card gave torch's allocator: above memory/peak_gib by its cache and fragmentation
            out["memory/reserved_peak_gib"] = self.reserved_peak
            out.update({f"memory/{phase}_peak_gib": peak for phase, peak in self.peaks.items()})
        if "train" in self.peaks and self.train_base is not None:
            # activations, the loss path and the gradients: the training pass's peak above its start
            out["memory/train_transient_gib"] = self.peaks["train"] - self.train_base
        return out


def step_progress(*, enabled: bool) -> Progress:
    """The training bar, on stderr (stdout carries results): step, reward, time spent and left."""
    return Progress(TextColumn("GRPO"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                    TextColumn("reward {task.fields[reward]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def is_eval_record(record: dict[str, Any]) -> bool:
    """A line of metrics.jsonl that an evaluation during training wrote, not an optimizer step."""
    return any(k.startswith("eval_") for k in record)


def warn_if_no_signal(history: list[dict], step: int) -> None:
    """Say early and plainly when GRPO has nothing to learn from."""
    if step != ZERO_STD_WINDOW:
        return
    recent = [r["frac_reward_zero_std"] for r in history[-ZERO_STD_WINDOW:]
              if r.get("frac_reward_zero_std") is not None]
    if recent and min(recent) >= ZERO_STD_ALARM:
        log.warning(
            "no learning signal: in the first %d steps at least %.0f%% of the groups had the same reward for every "
            "completion (frac_reward_zero_std), so their advantages are zero. Enable grpo.warmup (format warm-up), "
            "add a reward that separates completions (xmlcount, soft_format, proximity), raise grpo.num_generations "
            "or grpo.temperature, or use easier prompts.", ZERO_STD_WINDOW, 100 * ZERO_STD_ALARM)


def _sink(name: str, folder: Path, run_name: str, config: dict):
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("grpo.report_to: tensorboard is not installed; `pip install tensorboard`") from None
        writer = SummaryWriter(str(folder / "tensorboard"))

        def to_tensorboard(step: int, metrics: dict[str, float]) -> None:
            for key, value in metrics.items():
                if _finite(value):
                    writer.add_scalar(key, value, step)
            writer.flush()

        return to_tensorboard
    try:
        import wandb
    except ImportError:
        raise ConfigError("grpo.report_to: wandb is not installed; `pip install wandb`") from None
    run = wandb.init(project="grpoflow", name=run_name, config=config, dir=str(folder))
    return lambda step, m: run.log(m, step=step)


REWARD_WINDOW = 10  # logged steps at each end of a run that say where its reward started and ended


def reward_windows(history: list[dict], size: int = REWARD_WINDOW) -> dict[str, Any]:
    """The mean reward over the first and the last `size` logged steps, and the change between them.

    The windows never overlap: a run shorter than 2 x `size` logged steps is cut in halves (a
    10-step run compares steps 1-5 with 6-10; an odd middle step is in neither); one logged step has
    no change to show (None). `reward_window` says how many steps each mean is over."""
    window = min(size, len(history) // 2)
    first = _mean_key(history[:window], "reward") if window else None
    last = _mean_key(history[len(history) - window:], "reward") if window else None
    return {"reward_first": first, "reward_last": last, "reward_window": window,
            "reward_change": None if first is None or last is None else last - first}


def describe_reward(report: dict[str, Any]) -> str:
    """'0.186 (first 5 steps) -> 0.231 (last 5), +0.045' from a report.json; one written before the
    windows stopped overlapping (reward_first_10 / reward_last_10) reads as it was."""
    if "reward_window" not in report:
        return (f"{fmt_value(report.get('reward_first_10'))} (first 10 steps) -> "
                f"{fmt_value(report.get('reward_last_10'))} (last 10)")
    change = report["reward_change"]
    return (f"{fmt_value(report['reward_first'])} (first {report['reward_window']} steps) -> "
            f"{fmt_value(report['reward_last'])} (last {report['reward_window']}), "
            + ("-" if change is None else f"{change:+.3f}"))


def _mean_key(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _truncate_after(path: Path, step: int) -> None:
    if path.is_file():
        rewrite_records(path, [r for r in read_records(path) if r["step"] <= step])


def fmt_value(value: float | None) -> str:
    """A report's figure for a log line: three decimals, or '-' when there is none."""
    return "-" if value is None else f"{value:.3f}"
