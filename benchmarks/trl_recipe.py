"""TRL 1.16's GRPOTrainer on a grpoflow recipe: the same task, data, model and step budget, so that the
two learning curves can stand side by side (issue #20).

    python benchmarks/trl_recipe.py -c configs/chain-sum-gpu.yaml --data /tmp/chain/data/<hash> \
        --model /tmp/smollm2 --out /tmp/trl-chain --engine vllm
    python -m grpoflow.cli evaluate -c configs/chain-sum-gpu.yaml --model trl=/tmp/trl-chain/final

The recipe's grpo keys that TRL shares go over as they are (learning_rate, lr_scheduler_type,
max_steps, num_generations, per_device_train_batch_size, gradient_accumulation_steps,
max_completion_length, loss_type, beta, epsilon, temperature, seed; warmup_ratio as
transformers 5's fractional warmup_steps), the rewards are
the recipe's reward_funcs (grpoflow's own functions, handed to TRL), and everything else keeps TRL's
default: in particular TRL has no format warm-up, so it starts from --model as it is. Writes
<out>/trl_metrics.jsonl (TRL's log history, a line a step) and <out>/final (the trained model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# the grpo keys that mean the same in TRL's GRPOConfig
SHARED = ("learning_rate", "lr_scheduler_type", "max_steps", "num_generations",
          "per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length", "loss_type",
          "beta", "epsilon", "temperature", "seed")


def trl_rewards(names: list[str]) -> list:
    """grpoflow's reward functions, called as TRL calls a reward (keyword columns of the dataset)."""
    from grpoflow.rewards import load_reward

    funcs = []
    for name in names:
        fn = load_reward(name).fn

        def reward(prompts, completions, _fn=fn, **columns):
            return _fn(prompts=prompts, completions=completions, **columns)
        reward.__name__ = name.split(":")[-1]
        funcs.append(reward)
    return funcs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, required=True, help="the grpoflow recipe (its grpo section)")
    parser.add_argument("--data", type=Path, required=True, help="the recipe's prepared data folder (train.parquet)")
    parser.add_argument("--model", required=True, help="where TRL starts: a local Hugging Face folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="TRL's rollouts: generate or vLLM")
    parser.add_argument("--steps", type=int, help="override the recipe's max_steps (a smoke test)")
    parser.add_argument("--vllm-memory", type=float, default=0.3,
                        help="the colocated vLLM's gpu_memory_utilization (lower it when runs share the card)")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpoflow.config import load_config

    grpo = load_config(args.config).grpo
    shared = {key: getattr(grpo, key) for key in SHARED}
    shared["warmup_steps"] = grpo.warmup_ratio  # transformers 5: a float in [0, 1) is the share of the steps
    if args.steps:
        shared["max_steps"] = args.steps
    bf16 = torch.cuda.is_available()
    trl_args = GRPOConfig(
        output_dir=str(args.out / "trl"), **shared, bf16=bf16,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        use_vllm=args.engine == "vllm", vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_memory)
    columns = ["prompt", "answer"]
    dataset = Dataset.from_list(pq.read_table(args.data / "train.parquet", columns=columns).to_pylist())
    trainer = GRPOTrainer(model=args.model, reward_funcs=trl_rewards(grpo.reward_funcs), args=trl_args,
                          train_dataset=dataset)
    trainer.train()
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "trl_metrics.jsonl").open("w") as f:
        for record in trainer.state.log_history:
            f.write(json.dumps(record) + "\n")
    trainer.save_model(str(args.out / "final"))
    trainer.processing_class.save_pretrained(str(args.out / "final"))
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    print(json.dumps({"steps": len(rewards), "reward_first_10": sum(rewards[:10]) / max(1, len(rewards[:10])),
                      "reward_last_10": sum(rewards[-10:]) / max(1, len(rewards[-10:])), "final": str(args.out / "final")}))


if __name__ == "__main__":
    main()
