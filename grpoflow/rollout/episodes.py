"""Rollouts over several turns: the model answers, the environment replies, the model goes on.

    groups = run_episodes(engine, env, rows, params, seeds, max_turns=4)   # [prompts][n] Completions

The first turn is the engine's ordinary generate call on env.reset(row), so a single-turn
environment gives exactly what engine.generate gives. After each turn that ended at the
end-of-turn token, env.step sees the conversation; an observation is rendered as a "tool" message
by the chat template and its tokens appended, and the model's next turn is generated from the
whole sequence (engine.generate_ids: token ids in, no template applied again), one request per
live episode, all of a turn's in one call. An episode ends when the environment says done, when
the model's turn is cut at the budget (finished False), or after max_turns turns of the model.

A completion's token_ids then hold every turn after the prompt and the tool messages between
them; its mask is 1 for the model's tokens and 0 for the tool's, whose logprobs are 0; its text
is all of it decoded, its final_text the model's last turn (the answer the rewards read). The
budget is params.max_tokens for the whole of it (grpo.max_completion_length): the trainer's
tensors and vLLM's max_model_len are sized for that, whatever the number of turns.

Seeds: a later turn of completion j of a prompt seeded s draws from prompt_seed(s, turn * n + j),
so an episode's turns depend on its prompt alone, on any number of processes and across resumes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from grpoflow.errors import ConfigError
from grpoflow.rollout.base import Completion, Messages, RolloutEngine, SamplingParams
from grpoflow.rollout.seeded import prompt_seed

_SENTINEL = "\u2063grpoflow-turn-end\u2063"  # a model turn's text in the template probe


def run_episodes(engine: RolloutEngine, env, rows: list[dict[str, Any]], params: SamplingParams,
                 seeds: list[int] | None = None, *, max_turns: int = 1) -> list[list[Completion]]:
    """params.n episodes per row, in row order; each a Completion of every turn after the prompt."""
    prompts = [env.reset(r) for r in rows]
    groups = engine.generate(prompts, params, seeds=seeds)
    if max_turns == 1 or env.name == "single_turn":
        return groups
    tool = ToolMessages(engine.tokenizer)
    episodes = [_Episode(c, [*prompts[i], {"role": "assistant", "content": c.text}], i, j)
                for i, group in enumerate(groups) for j, c in enumerate(group)]
    live = [e for e in episodes if e.completion.finished]  # a turn cut at the budget ends its episode
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:  # tool calls wait on children
        for turn in range(1, max_turns):
            results = list(pool.map(lambda e: env.step(e.messages, e.last_text), live))
            waiting = []
            for e, (observation, done, parts) in zip(live, results):
                c = e.completion
                for key, value in parts.items():
                    c.parts[key] = c.parts.get(key, 0) + value
                if done or observation is None:
                    continue
                e.messages.append({"role": "tool", "content": observation})
                ids = tool.ids(observation, after_token=c.token_ids[-1])
                room = params.max_tokens - len(c.token_ids)
                e.append(ids[:room], written=False)
                if len(ids) >= room:  # no room left for the model's answer: cut, as a long turn is
                    c.finished = False
                    continue
                waiting.append(e)
            if not waiting:
                break
            rooms = [params.max_tokens - len(e.completion.token_ids) for e in waiting]
            next_params = replace(params, n=1, max_tokens=max(rooms), truncate_prompt_tokens=None)
            turn_seeds = None if seeds is None else [prompt_seed(seeds[e.row], turn * params.n + e.sample)
                                                     for e in waiting]
            outs = engine.generate_ids([e.completion.prompt_ids + e.completion.token_ids for e in waiting],
                                       next_params, seeds=turn_seeds)
            for e, room, [out] in zip(waiting, rooms, outs):
                # one call serves every episode: each keeps what fits its own budget
                ids = out.token_ids[:room]
                e.append(ids, written=True, logprobs=None if out.logprobs is None else out.logprobs[:room])
                e.completion.finished = out.finished and len(out.token_ids) <= room
                e.completion.turns += 1
                e.last_text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                e.messages.append({"role": "assistant", "content": e.last_text})
            live = [e for e in waiting if e.completion.finished]
    for e in episodes:
        c = e.completion
        if c.mask is not None:
            c.text, c.last_turn = engine.tokenizer.decode(c.token_ids, skip_special_tokens=True), e.last_text
        for key in env.columns:
            c.parts.setdefault(key, 0)
    return groups


@dataclass
class _Episode:
    completion: Completion  # grown in place: the group's own object
    messages: Messages  # the conversation so far, for env.step
    row: int  # the prompt's index in the call
    sample: int  # which of its n completions

    def __post_init__(self):
        self.last_text = self.completion.text  # the model's latest turn

    def append(self, ids: list[int], *, written: bool, logprobs: list[float] | None = None) -> None:
        c = self.completion
        if c.mask is None:
            c.mask = [1] * len(c.token_ids)
        c.token_ids = c.token_ids + list(ids)
        c.mask = c.mask + [int(written)] * len(ids)
        if c.logprobs is not None:  # a tool token's log-prob is 0: it was not sampled, and is masked out
            c.logprobs = c.logprobs + (list(logprobs) if written and logprobs is not None else [0.0] * len(ids))


class ToolMessages:
    """The tokens of a tool message between two model turns, as the chat template renders them: what
    follows the model's end-of-turn token (SmolLM2: "\\n<|im_start|>tool\\n{output}<|im_end|>\\n"),
    then the header of the model's next turn ("<|im_start|>assistant\\n")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
        self.base = tokenizer.apply_chat_template(self.probe, tokenize=False)
        if _SENTINEL not in self.base:
            raise ConfigError("rollout.environment: the model's chat template drops an assistant turn's text; "
                              "multi-turn rollouts need a template that renders whole conversations")
        self.after_turn = self.base[self.base.rindex(_SENTINEL) + len(_SENTINEL):]  # "<|im_end|>\n"

    def ids(self, observation: str, *, after_token: int) -> list[int]:
        """after_token: the last token of the model's turn (its end-of-turn token), already in the sequence."""
        try:
            full = self.tokenizer.apply_chat_template([*self.probe, {"role": "tool", "content": observation}],
                                                      tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError, or a template that raises on an unknown role
            raise ConfigError(f"rollout.environment: the model's chat template cannot render a message of role "
                              f"'tool' ({e}); use a model whose template has one, or rollout.environment: "
                              f"single_turn") from e
        if not full.startswith(self.base):
            raise ConfigError("rollout.environment: the model's chat template renders a conversation differently "
                              "once a tool message follows it; multi-turn rollouts need each turn rendered as is")
        end = self.tokenizer.decode([after_token])
        text = self.after_turn.removeprefix(end) + full[len(self.base):]
        return self.tokenizer(text, add_special_tokens=False).input_ids
