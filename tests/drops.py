"""Rows and drop files for the continuous-flow tests: GSM8K-shaped questions with their worked answers."""

from __future__ import annotations

import json
from pathlib import Path


def rows(numbers) -> list[dict]:
    return [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in numbers]


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def continuous_setup(root: Path, model: Path, *, drop_rows: int, grpo: dict, eval: dict, orchestration: dict | None = None,
                     **continuous) -> Path:
    """A drop folder with one drop (`drop_rows` rows), a held-out file and a config file for a run of the
    continuous flow on the tiny LoRA model, as a separate process reads it; the config's path."""
    (root / "drops").mkdir(parents=True)
    (root / "heldout.jsonl").write_text(jsonl(rows(range(500, 504))))
    (root / "drops" / "d1.jsonl").write_text(jsonl(rows(range(drop_rows))))
    config = {"data": {"answer_format": "gsm8k"},
              "model": {"name_or_path": str(model), "finetune": "lora", "dtype": "float32",
                        "lora": {"target_modules": ["q_proj", "v_proj"]}},
              "grpo": {"num_generations": 4, "max_completion_length": 8, "gradient_checkpointing": False,
                       "save_steps": 1, "warmup": {"enabled": False}, **grpo},
              "eval": eval, "export": {"quantizations": []}, "orchestration": orchestration or {},
              "continuous": {"drop_dir": str(root / "drops"), "heldout": str(root / "heldout.jsonl"),
                             "state_dir": str(root / "state"), "settle_seconds": 0, **continuous}}
    path = root / "config.yaml"
    path.write_text(json.dumps(config))
    return path
