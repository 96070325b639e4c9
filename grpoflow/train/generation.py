"""One generation: prompts -> G completions each -> rewards -> advantages -> training tensors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from grpoflow.advantages import compute_advantages
from grpoflow.config import GRPOConfig
from grpoflow.rewards import RewardSet
from grpoflow.rewards.reward_set import Scores
from grpoflow.rollout import RolloutEngine, SamplingParams
from grpoflow.rollout.hf import left_pad
from grpoflow.train.distributed import Distributed
from grpoflow.train.logps import completion_logps

COLUMNS = ("answer", "question", "solution", "metadata")  # dataset columns the rewards receive


@dataclass
class GenerationBatch:
    """The rows of one generation, in group order (a prompt's G completions are consecutive)."""
    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    completion_mask: torch.Tensor  # [N, T], float; 0 after EOS, and for truncated ones when masked
    advantages: torch.Tensor  # [N]
    old_logps: torch.Tensor | None  # [N, T]; None: the policy has not moved since sampling
    # [N, T] truncated importance-sampling ratio for another engine's samples (TRL's name); None: 1
    importance_sampling_ratio: torch.Tensor | None
    # [N, T] that engine's sampling log-probs, when the weights are made at the loss instead: on-policy,
    # the loss's own log-probs are the trainer's, and a second forward pass to get them is saved
    sampling_logps: torch.Tensor | None
    num_items: int  # active completion tokens in the whole generation, all processes (dapo's normaliser)
    metrics: dict[str, float]  # of the whole generation, all processes
    samples: list[dict[str, Any]] = field(default_factory=list)  # this process's, for the completions log
    num_processes: int = 1  # that made the generation; each holds its share of the rows
    rows: list[int] = field(default_factory=list)  # each completion's row of the training set (its index)

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    def slice(self, start: int, stop: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[start:stop], "attention_mask": self.attention_mask[start:stop],
                "completion_mask": self.completion_mask[start:stop], "advantages": self.advantages[start:stop],
                "old_logps": None if self.old_logps is None else self.old_logps[start:stop],
                "importance_sampling_ratio": (None if self.importance_sampling_ratio is None
                                              else self.importance_sampling_ratio[start:stop]),
                "sampling_logps": None if self.sampling_logps is None else self.sampling_logps[start:stop]}


def generate_batch(engine: RolloutEngine, policy, rows: list[dict[str, Any]], rewards: RewardSet, grpo: GRPOConfig,
                   *, need_old_logps: bool, micro_batch: int, seeds: list[int] | None = None,
                   dist: Distributed | None = None) -> GenerationBatch:
    """rows: this process's prompts of the generation (all of them with one process). Rewards are
    scored here, where the completions are; advantages and metrics are over the whole generation,
    every process's groups together, as one process would compute them."""
    dist = dist or Distributed(0, 1, 0, policy.device)
    G = grpo.num_generations
    started = time.perf_counter()
    # another engine (vLLM) samples from its own copy of the weights, computed its own way: its
    # per-token log-probs against the trainer's give the truncated importance-sampling weights
    correct = engine.name != "hf" and grpo.vllm_importance_sampling_correction
    params = SamplingParams(max_tokens=grpo.max_completion_length, temperature=grpo.temperature, top_p=grpo.top_p,
                            top_k=grpo.top_k, min_p=grpo.min_p, repetition_penalty=grpo.repetition_penalty, n=G,
                            truncate_prompt_tokens=grpo.max_prompt_length, logprobs=correct)
    groups = engine.generate([r["prompt"] for r in rows], params, seeds=seeds)
    gen_seconds = time.perf_counter() - started
    completions = [c for group in groups for c in group]  # [N], group order
    texts = [c.text for c in completions]
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in COLUMNS}
    scores = rewards.score(prompts, texts, **columns)
    # a few numbers per completion cross processes; the completions stay where they are
    mine = {"scores": scores, "seconds": gen_seconds, "phases": dict(getattr(engine, "timings", {})),
            "lengths": [len(c.token_ids) for c in completions],
            "finished": [c.finished for c in completions], "prompts_truncated": sum(g[0].prompt_truncated for g in groups),
            "num_items": sum(len(c.token_ids) for c in completions if c.finished or not grpo.mask_truncated_completions)}
    everyone = dist.all_gather(mine)
    every_score = Scores({n: [v for e in everyone for v in e["scores"].per_reward[n]] for n in rewards.names},
                         [t for e in everyone for t in e["scores"].totals],
                         {n: sum(e["scores"].errors[n] for e in everyone) for n in rewards.names})

    totals = torch.tensor(every_score.totals, dtype=torch.float32)  # [W*N], rank order = generation order
    applied = torch.tensor([any(every_score.per_reward[n][i] is not None for n in rewards.names)
                            for i in range(len(totals))])  # [W*N]: a completion no reward applies to gets A = 0
    all_advantages, adv_stats = compute_advantages(totals, G, grpo.scale_rewards, valid=applied)  # [W*N]
    N = len(completions)
    advantages = all_advantages[dist.rank * N:(dist.rank + 1) * N]  # [N], this process's groups

    device = policy.device
    pad = policy.tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([c.prompt_ids for c in completions], pad, device)  # [N, P]
    width = max(1, max(len(c.token_ids) for c in completions))
    completion_ids = torch.full((len(completions), width), pad, dtype=torch.long, device=device)  # [N, T]
    completion_mask = torch.zeros((len(completions), width), dtype=torch.float32, device=device)  # [N, T]
    for i, c in enumerate(completions):
        completion_ids[i, :len(c.token_ids)] = torch.tensor(c.token_ids, device=device)
        if c.finished or not grpo.mask_truncated_completions:
            completion_mask[i, :len(c.token_ids)] = 1.0
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P + T]
    attention_mask = torch.cat([prompt_mask, _written(completions, width, device)], dim=1)  # [N, P + T]

    old_logps, importance_sampling_ratio, is_metrics = None, None, {}
    sampling_logps = _sampling_logps(completions, width, device) if correct else None  # [N, T]
    if need_old_logps:
        # the policy will move before some of these rows are trained on: keep its log-probs now
        with torch.no_grad(), policy.autocast():
            parts = [policy.run(completion_logps, input_ids[i:i + micro_batch], attention_mask[i:i + micro_batch],
                                width, temperature=grpo.temperature, kernels=grpo.kernels)[0]
                     for i in range(0, len(completions), micro_batch)]
        old_logps = torch.cat(parts).float()  # [N, T]
        if correct:
            importance_sampling_ratio, is_metrics = importance_weights(old_logps, sampling_logps, completion_mask,
                                                        grpo.vllm_importance_sampling_cap)
            sampling_logps = None
    # else on-policy: the loss makes the weights from its own log-probs (sampling_logps kept)

    lengths = torch.tensor([n for e in everyone for n in e["lengths"]], dtype=torch.float32)  # [W*N]
    finished = torch.tensor([f for e in everyone for f in e["finished"]])  # [W*N]
    slowest = max(everyone, key=lambda e: e["seconds"])  # the generation is done when the slowest process is
    gen_seconds = slowest["seconds"]
    metrics = {
        **every_score.metrics(G), **adv_stats,
        "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - finished.float().mean().item(),
        "completions/mean_terminated_length": lengths[finished].mean().item() if finished.any() else 0.0,
        "prompts/truncated": float(sum(e["prompts_truncated"] for e in everyone)),
        "generation/seconds": gen_seconds,
        # with several processes, the step waits for the slowest: the fastest says how uneven they were
        "generation/fastest_process_seconds": min(e["seconds"] for e in everyone),
        "generation/tokens_per_second": lengths.sum().item() / gen_seconds if gen_seconds else 0.0,
        # the slowest process's engine phases (vLLM: wake_up, prepare, sample, decode)
        **{f"time/rollout_{k}_seconds": v for k, v in slowest["phases"].items()},
        **is_metrics,
    }
    samples = [{"prompt": prompts[i][-1]["content"], "completion": texts[i], "answer": columns["answer"][i],
                "reward": scores.totals[i], "advantage": advantages[i].item(),
                **{f"rewards/{n}": scores.per_reward[n][i] for n in rewards.names}}
               for i in range(len(completions))]
    return GenerationBatch(input_ids, attention_mask, completion_mask, advantages.to(device), old_logps,
                           importance_sampling_ratio,
                           sampling_logps, sum(e["num_items"] for e in everyone), metrics, samples, dist.world_size)


def importance_weights(trainer_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                       cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """min(p_trainer / p_sampler, cap) per token: truncated importance sampling (TRL's metric names).

    trainer_logps, sampling_logps, mask [N, T] -> weights [N, T] (1 at padding), metrics.
    """
    difference = (trainer_logps.detach().float() - sampling_logps) * mask  # [N, T]
    ratio = torch.exp(difference).clamp(max=cap)  # [N, T]
    active = mask.bool()
    if not active.any():
        return ratio, {}
    return ratio, {
        "sampling/sampling_logp_difference/mean": difference[active].abs().mean().item(),
        "sampling/sampling_logp_difference/max": difference[active].abs().max().item(),
        "sampling/importance_sampling_ratio/min": ratio[active].min().item(),
        "sampling/importance_sampling_ratio/mean": ratio[active].mean().item(),
        "sampling/importance_sampling_ratio/max": ratio[active].max().item(),
    }


def _sampling_logps(completions, width: int, device) -> torch.Tensor:
    """The engine's per-token sampling log-probs, right-padded with 0  # [N, T]"""
    out = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, c in enumerate(completions):
        out[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    return out.to(device)


def _written(completions, width: int, device) -> torch.Tensor:
    """1 where a completion token exists (masked-out truncated ones still attend normally)."""
    out = torch.zeros((len(completions), width), dtype=torch.long, device=device)
    for i, c in enumerate(completions):
        out[i, :len(c.token_ids)] = 1
    return out
