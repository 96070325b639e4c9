"""Rollouts with transformers' generate: works everywhere, the reference for faster engines."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from rich.progress import Progress

from grpoflow.rollout.base import Completion, Messages, SamplingParams


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16, progress: bool = True,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.autocast = autocast
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        results: list[list[Completion]] = []
        was_training = self.model.training
        self.model.eval()  # no dropout, and no gradient checkpointing, while sampling
        try:
            with Progress(disable=not self.progress, transient=True) as progress:
                task = progress.add_task(f"generating ({self.name})", total=len(texts))
                for start in range(0, len(texts), self.batch_size):
                    batch = texts[start:start + self.batch_size]
                    if params.seed is not None:
                        torch.manual_seed(params.seed + start)
                    results.extend(self._generate_batch(batch, params))
                    progress.advance(task, len(batch))
        finally:
            self.model.train(was_training)
        return results

    @torch.no_grad()
    def _generate_batch(self, texts: list[str], params: SamplingParams) -> list[list[Completion]]:
        prompt_ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        keep = params.truncate_prompt_tokens
        truncated = [keep is not None and len(ids) > keep for ids in prompt_ids]
        prompt_ids = [ids[-keep:] if keep else ids for ids in prompt_ids]
        input_ids, attention_mask = left_pad(prompt_ids, self.tokenizer.pad_token_id, self.model.device)  # [B, P]
        sampling = {} if params.greedy else {
            "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k or None, "min_p": params.min_p or None}
        with self.autocast():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=params.max_tokens,
                num_return_sequences=params.n, repetition_penalty=params.repetition_penalty,
                pad_token_id=self.tokenizer.pad_token_id, use_cache=True, output_scores=params.logprobs,
                return_dict_in_generate=True, do_sample=not params.greedy, **sampling)
        generated = out.sequences[:, input_ids.shape[1]:]  # [B*n, T]
        logprobs = None
        if params.logprobs:
            # log-probs after the sampler's processing (temperature, top-p, ...): what it drew from
            logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # [B*n, T]
        eos_ids = self._eos_ids()
        completions = []
        for row in range(generated.shape[0]):
            ids = generated[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), None)
            finished = end is not None
            ids = ids[:end] if finished else ids
            completions.append(Completion(
                prompt_ids=prompt_ids[row // params.n], token_ids=ids,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                logprobs=logprobs[row, :len(ids)].float().tolist() if logprobs is not None else None,
                finished=finished, prompt_truncated=truncated[row // params.n]))
        return [completions[i:i + params.n] for i in range(0, len(completions), params.n)]

    # The policy *is* this engine's model: nothing to copy after an optimizer step, nothing to release.
    def sync_weights(self, policy, step: int) -> None:
        pass

    def sleep(self) -> None:
        pass

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, P]
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)
