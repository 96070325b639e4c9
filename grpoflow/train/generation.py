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
from grpoflow.environments import Environment, SingleTurn
from grpoflow.rollout import Completion, RolloutEngine, SamplingParams
from grpoflow.rollout.episodes import run_episodes
from grpoflow.rollout.hf import left_pad
from grpoflow.train.distributed import Distributed
from grpoflow.train.logps import completion_logps

COLUMNS = ("answer", "question", "solution", "metadata")  # dataset columns the rewards receive


@dataclass
class GenerationBatch:
    """The rows of one generation, in group order (a prompt's G completions are consecutive)."""
    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    # [N, T], float; 0 after EOS, at a tool message's tokens (multi-turn), and for truncated ones when masked
    completion_mask: torch.Tensor
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
    rows: list[int | None] = field(default_factory=list)  # each completion's training row (index); None: masked out

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    def slice(self, start: int, stop: int) -> dict[str, Any]:
        return self.rows_of(list(range(start, min(stop, len(self.advantages)))))

    def rows_of(self, index: list[int]) -> dict[str, Any]:
        """These rows, without the padding none of them needs: the prompt columns that are padding
        in every row (prompts are left-padded) and the completion columns after the longest one.
        Rotary positions are relative, so dropping shared left padding changes no log-prob."""
        at = torch.tensor(index, device=self.input_ids.device)
        T = self.completion_len
        P = self.input_ids.shape[1] - T
        attention = self.attention_mask[at]  # [b, P + T]
        used = attention[:, :P].sum(0).nonzero()
        first = int(used[0]) if len(used) else P  # the first prompt column some row uses
        width = max(1, int(attention[:, P:].sum(1).max()))  # completions are written from column 0 on

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[at, :width]

        return {"input_ids": self.input_ids[at, first:P + width], "attention_mask": attention[:, first:P + width],
                "completion_mask": self.completion_mask[at, :width], "advantages": self.advantages[at],
                "old_logps": cut(self.old_logps), "importance_sampling_ratio": cut(self.importance_sampling_ratio),
                "sampling_logps": cut(self.sampling_logps)}

    def forward_chunks(self, start: int, stop: int, max_tokens: int | None) -> list[list[int]]:
        """Rows start..stop in groups whose padded length x rows stays within max_tokens (None:
        one group), longest completions first, so that rows of like length share a forward."""
        rows = list(range(start, min(stop, len(self.advantages))))
        if max_tokens is None:
            return [rows]
        P = self.input_ids.shape[1] - self.completion_len
        prompt = self.attention_mask[rows, :P].sum(1).tolist()
        written = self.attention_mask[rows, P:].sum(1).tolist()
        order = sorted(range(len(rows)), key=lambda i: -(prompt[i] + written[i]))
        chunks, current, widest = [], [], (0, 0)  # the chunk's longest prompt and longest completion
        for i in order:
            wider = (max(widest[0], prompt[i]), max(widest[1], written[i]))
            if current and sum(wider) * (len(current) + 1) > max_tokens:
                chunks.append(current)
                current, wider = [], (prompt[i], written[i])
            current.append(rows[i])
            widest = wider
        return chunks + [current]


@dataclass
class Sampled:
    """One process's share of a generation as the engine gave it, scored: what the rollouts hand the
    trainer (grpoflow/train/rollouts.py), and what a checkpoint keeps of a generation sampled ahead.
    Groups are whole: a prompt's G completions are consecutive."""
    rows: list[int]  # the training row of each group
    groups: list[list[Completion]]  # [groups][G]
    scores: Scores  # of the groups' completions, flattened in group order
    seconds: float  # generating them (every generate call of the generation)
    phases: dict[str, float] = field(default_factory=dict)  # the engine's last call (vLLM: wake_up, sample ...)
    version: int = 0  # optimizer steps of the weights that sampled them
    masked: list[bool] = field(default_factory=list)  # [groups]: tied groups that train masked out (dynamic sampling)
    drawn: Scores | None = None  # every group drawn, dropped ones too (dynamic sampling): the reward metrics
    dynamic: dict[str, float] = field(default_factory=dict)  # dynamic sampling's counts, this process's
    wait_seconds: float = 0.0  # how long the trainer waited for it (rollout.mode async)
    drawn_from: dict | None = None  # the prompt sampler's state before its draws (a lost rollout server's undo)


def sampling_params(grpo: GRPOConfig, *, logprobs: bool, ignore_eos: bool = False) -> SamplingParams:
    return SamplingParams(max_tokens=grpo.max_completion_length, temperature=grpo.temperature, top_p=grpo.top_p,
                          top_k=grpo.top_k, min_p=grpo.min_p, repetition_penalty=grpo.repetition_penalty,
                          n=grpo.num_generations, truncate_prompt_tokens=grpo.max_prompt_length, logprobs=logprobs,
                          ignore_eos=ignore_eos)


def needs_sampling_logps(engine: RolloutEngine, grpo: GRPOConfig, *, stale: bool = False) -> bool:
    """Another engine (vLLM) samples from its own copy of the weights, computed its own way, and
    older weights (rollout.mode async) sample another distribution: their per-token log-probs against
    the trainer's give the truncated importance-sampling weights."""
    return (engine.name != "hf" or stale) and grpo.vllm_importance_sampling_correction


def sample_groups(engine: RolloutEngine, rows: list[dict[str, Any]], indices: list[int], rewards: RewardSet,
                  grpo: GRPOConfig, *, seeds: list[int] | None = None, logprobs: bool = False,
                  ignore_eos: bool = False, env: Environment | None = None, max_turns: int = 1) -> Sampled:
    """Generate num_generations completions (episodes, with a multi-turn environment) for each row
    and score them: no collective, no tensor for the trainer (the rollout thread runs it in
    rollout.mode async). With a multi-turn environment the rewards score the model's last turn (the
    answer), and get the environment's counts (tool_calls ...) and the whole episode's text
    (`conversation`) as columns."""
    G = grpo.num_generations
    env = env or SingleTurn()
    started = time.perf_counter()
    groups = run_episodes(engine, env, rows, sampling_params(grpo, logprobs=logprobs, ignore_eos=ignore_eos), seeds,
                          max_turns=max_turns)
    seconds = time.perf_counter() - started
    texts = [c.final_text for group in groups for c in group]  # the answer: the model's last turn
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in COLUMNS}
    columns.update({k: [c.parts[k] for group in groups for c in group] for k in env.columns})
    if env.columns:  # the whole episode, every turn and tool message, for a reward that reads it all
        columns["conversation"] = [c.text for group in groups for c in group]
    scores = rewards.score(prompts, texts, **columns)
    return Sampled(list(indices), groups, scores, seconds, dict(getattr(engine, "timings", {})),
                   masked=[False] * len(groups))


def generate_batch(engine: RolloutEngine, policy, rows: list[dict[str, Any]], rewards: RewardSet, grpo: GRPOConfig,
                   *, need_old_logps: bool, micro_batch: int, seeds: list[int] | None = None,
                   dist: Distributed | None = None, env: Environment | None = None,
                   max_turns: int = 1) -> GenerationBatch:
    """rows: this process's prompts of the generation (all of them with one process), sampled and
    made into training tensors at once (the synchronous path, one generate call a turn)."""
    correct = needs_sampling_logps(engine, grpo)
    sampled = sample_groups(engine, rows, list(range(len(rows))), rewards, grpo, seeds=seeds, logprobs=correct,
                            env=env, max_turns=max_turns)
    return build_batch(sampled, rows, policy, rewards, grpo, need_old_logps=need_old_logps, micro_batch=micro_batch,
                       dist=dist, correct=correct)


def build_batch(sampled: Sampled, rows: list[dict[str, Any]], policy, rewards: RewardSet, grpo: GRPOConfig, *,
                need_old_logps: bool, micro_batch: int, dist: Distributed | None = None,
                correct: bool = False) -> GenerationBatch:
    """rows: the dataset rows of sampled's groups. Advantages and metrics are over the whole
    generation, every process's groups together, as one process would compute them; a masked
    group (dynamic sampling came up short) keeps its place with a completion mask of zeros."""
    dist = dist or Distributed(0, 1, 0, policy.device)
    G = grpo.num_generations
    groups, scores = sampled.groups, sampled.scores
    completions = [c for group in groups for c in group]  # [N], group order
    texts = [c.text for c in completions]
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in COLUMNS}
    masked = [m for m in (sampled.masked or [False] * len(groups)) for _ in range(G)]  # [N]
    # a few numbers per completion cross processes; the completions stay where they are
    mine = {"scores": scores, "drawn": sampled.drawn or scores, "seconds": sampled.seconds, "phases": sampled.phases,
            "lengths": [len(c.token_ids) for c in completions],
            "finished": [c.finished for c in completions], "prompts_truncated": sum(g[0].prompt_truncated for g in groups),
            "num_items": sum(c.model_tokens for c, m in zip(completions, masked)
                             if not m and (c.finished or not grpo.mask_truncated_completions)),
            "turns": [c.turns for c in completions], "parts": [c.parts for c in completions],
            "dynamic": sampled.dynamic, "version": sampled.version, "wait": sampled.wait_seconds}
    everyone = dist.all_gather(mine)
    every_score = Scores({n: [v for e in everyone for v in e["scores"].per_reward[n]] for n in rewards.names},
                         [t for e in everyone for t in e["scores"].totals],
                         {n: sum(e["scores"].errors[n] for e in everyone) for n in rewards.names})
    every_drawn = Scores({n: [v for e in everyone for v in e["drawn"].per_reward[n]] for n in rewards.names},
                         [t for e in everyone for t in e["drawn"].totals],
                         {n: sum(e["drawn"].errors[n] for e in everyone) for n in rewards.names})

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
        if not masked[i] and (c.finished or not grpo.mask_truncated_completions):
            # the model's own tokens: a tool message's are context, never trained on
            completion_mask[i, :len(c.token_ids)] = 1.0 if c.mask is None else torch.tensor(c.mask, device=device)
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
    dynamic = any(e["dynamic"] for e in everyone)
    # with dynamic sampling, the reward figures are those of every group drawn (as without it); the
    # groups trained on are all informative, unless the draws came up short
    reward_stats = ({**adv_stats, **every_drawn.metrics(G),
                     "dynamic_sampling/frac_reward_zero_std_trained": adv_stats["frac_reward_zero_std"]}
                    if dynamic else {**every_score.metrics(G), **adv_stats})
    metrics = {
        **reward_stats,
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
        **_rollout_metrics(everyone),
        **_episode_metrics(everyone),
    }
    samples = [{"prompt": prompts[i][-1]["content"], "completion": texts[i], "answer": columns["answer"][i],
                "reward": scores.totals[i], "advantage": advantages[i].item(), **completions[i].parts,
                **({"last_turn": completions[i].last_turn} if completions[i].last_turn is not None else {}),
                **{f"rewards/{n}": scores.per_reward[n][i] for n in rewards.names}}
               for i in range(len(completions))]
    return GenerationBatch(input_ids, attention_mask, completion_mask, advantages.to(device), old_logps,
                           importance_sampling_ratio,
                           sampling_logps, sum(e["num_items"] for e in everyone), metrics, samples, dist.world_size)


def _rollout_metrics(everyone: list[dict[str, Any]]) -> dict[str, float]:
    """Staleness and waiting (rollout.mode async), dynamic sampling's counts: over every process."""
    out = {"rollout/version": float(min(e["version"] for e in everyone)),
           "rollout/wait_seconds": max(e["wait"] for e in everyone)}
    for key in dict.fromkeys(k for e in everyone for k in e["dynamic"]):
        values = [e["dynamic"].get(key, 0.0) for e in everyone]
        out[f"dynamic_sampling/{key}"] = max(values) if key == "draws" else float(sum(values))
    return out


def _episode_metrics(everyone: list[dict[str, Any]]) -> dict[str, float]:
    """Multi-turn environments: turns per episode, and each count the environment keeps (tool_calls,
    tool_errors) per episode, over every process; nothing for single-turn rollouts."""
    turns = [t for e in everyone for t in e["turns"]]
    parts = [p for e in everyone for p in e["parts"]]
    if not any(parts):
        return {}
    out = {"completions/mean_turns": sum(turns) / len(turns)}
    for key in dict.fromkeys(k for p in parts for k in p):
        out[f"tools/{key}/mean"] = sum(p.get(key, 0) for p in parts) / len(parts)
    calls = sum(p.get("tool_calls", 0) for p in parts)
    if "tool_calls" in parts[0]:  # the share of episodes that call the tool, and of calls that fail
        out["tools/call_frequency"] = sum(p.get("tool_calls", 0) > 0 for p in parts) / len(parts)
        out["tools/failure_frequency"] = sum(p.get("tool_errors", 0) for p in parts) / calls if calls else 0.0
    return out


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
