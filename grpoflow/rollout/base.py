"""The engine interface and its data types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Messages = list[dict[str, str]]  # [{"role": "system", "content": ...}, {"role": "user", ...}]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1  # completions per prompt (num_generations)
    seed: int | None = None
    logprobs: bool = False  # return the sampler's per-token log-probs (costs [B, V] floats a step)
    truncate_prompt_tokens: int | None = None  # keep the last N prompt tokens (max_prompt_length)
    ignore_eos: bool = False  # every completion runs to max_tokens (benchmarks of long completions)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, EOS included when generation stopped there
    text: str  # decoded without special tokens
    logprobs: list[float] | None  # the sampler's log-prob of each generated token, when asked
    finished: bool  # True: stopped at EOS; False: cut at max_tokens (truncated)
    prompt_truncated: bool = False  # the prompt lost tokens on the left to truncate_prompt_tokens
    # Multi-turn episodes (grpoflow/rollout/episodes.py): token_ids hold every turn after the prompt,
    # the tool's messages between the model's turns; mask is 1 for a token the model wrote, 0 for
    # one of a tool message (its logprob is 0). None: every token is the model's (one turn).
    mask: list[int] | None = None
    turns: int = 1  # the model's turns
    parts: dict[str, int] = field(default_factory=dict)  # the environment's counts, summed (tool_calls ...)
    last_turn: str | None = None  # the model's last turn, decoded, when there were several

    @property
    def final_text(self) -> str:
        """What answers the question: the model's last turn (all of text for one turn). The
        rewards and the verdicts read it; text, every turn and tool message, is what the logs show."""
        return self.text if self.last_turn is None else self.last_turn

    @property
    def model_tokens(self) -> int:
        """How many of token_ids the model wrote: what the loss trains on."""
        return len(self.token_ids) if self.mask is None else sum(self.mask)


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """One list of `params.n` completions per prompt, in prompt order. seeds: one per prompt,
        making its completions independent of the rest of the batch (grpoflow/rollout/seeded.py)."""
        ...

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[Completion]]:
        """generate for prompts given as token ids (a multi-turn episode's next turn: the prompt,
        the turns so far and the tool's message), as they are: no chat template is applied."""
        ...

    def sync_weights(self, policy, step: int) -> None:
        """Sample from `policy` as it is now (after an optimizer step) from the next generate on."""
        ...

    def sleep(self) -> None:
        """Release what generation holds (KV cache) until the next generate."""
        ...
