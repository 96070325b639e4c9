"""Sampling that depends on the prompt, not on the batch it was generated in.

transformers' generate draws every row from the one global RNG, so a prompt's completions change
with whatever else is in the batch: on 2 processes, each generating half of the prompts, they
would differ from a 1-process run. Here each prompt has its own seed, made from (run seed, the
prompt's number among all the prompts the run has drawn), and its completions are drawn from a
generator of its own: the same completions on any number of processes, and across resumes.

    seeds = [prompt_seed(grpo.seed, first + i) for i in range(len(prompts))]
    groups = engine.generate(prompts, params, seeds=seeds)
"""

from __future__ import annotations

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from grpoflow.rollout.base import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # the golden-ratio constant of splitmix64


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit seed for the index-th prompt the run draws (PromptSampler.drawn counts them)."""
    x = (seed * _MIX + index) % 2**64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) % 2**64
    return (x ^ (x >> 29)) % 2**63


class SeededSampling(LogitsProcessor):
    """Samples each row itself and hands generate a one-hot choice (generate runs greedy).

    The sampler's own processing (temperature, top-k, top-p, min-p) is applied here, after the
    processors generate adds in greedy mode (repetition penalty). Each prompt's n rows draw their
    Gumbel noise [n, V] from the prompt's generator, one draw per decoding step: argmax(logits +
    Gumbel) is a sample of softmax(logits), and a row's noise does not depend on other prompts.
    `logprobs` collects the log-prob of each chosen token under the processed distribution.
    """

    def __init__(self, seeds: list[int], params: SamplingParams, device: torch.device):
        self.n = params.n
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        warpers = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
        if params.top_k:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            warpers.append(MinPLogitsWarper(params.min_p))
        self.warpers = LogitsProcessorList(warpers)
        self.logprobs: list[torch.Tensor] = []  # per step, [B*n]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.warpers(input_ids, scores.float())  # [B*n, V]
        logps = torch.log_softmax(scores, dim=-1)  # [B*n, V]
        uniform = torch.cat([torch.rand((self.n, scores.shape[1]), generator=g, device=scores.device)
                             for g in self.generators])  # [B*n, V], each prompt's rows from its generator
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))  # [B*n, V]
        chosen = torch.argmax(logps + gumbel, dim=-1)  # [B*n]
        self.logprobs.append(logps.gather(1, chosen[:, None]).squeeze(1))
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)  # [B*n, V]: greedy picks `chosen`
        return out
