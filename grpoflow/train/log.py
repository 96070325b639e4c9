"""Training logs with no external service: JSONL per step, sampled completions, a reward plot.

TensorBoard or Weights & Biases join when `grpo.report_to` asks for them and they are installed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from grpoflow.config import ConfigError
from grpoflow.jsonl import append_records, read_records, rewrite_records


class RunLogger:
    """write=False (every process but rank 0 of a data-parallel run): history in memory, no files."""

    def __init__(self, folder: Path, *, resume_step: int, report_to: list[str], run_name: str, config: dict,
                 write: bool = True):
        self.folder = folder
        self.write = write
        self.metrics_path = folder / "metrics.jsonl"
        self.completions_path = folder / "completions.jsonl"
        self.history, self.sinks = [], []
        if not write:
            return
        # a resumed run redoes the steps after its checkpoint: drop their old lines (and a torn last line)
        for path in (self.metrics_path, self.completions_path):
            _truncate_after(path, resume_step)
        self.history = read_records(self.metrics_path)
        self.sinks = [_sink(name, folder, run_name, config) for name in report_to]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.history.append(record)
        if not self.write:
            return
        append_records(self.metrics_path, [record])
        for sink in self.sinks:
            sink(step, metrics)

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        if not self.write:
            return
        append_records(self.completions_path, [{"step": step, **s} for s in samples])  # one write; each record whole

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


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _truncate_after(path: Path, step: int) -> None:
    if path.is_file():
        rewrite_records(path, [r for r in read_records(path) if r["step"] <= step])
