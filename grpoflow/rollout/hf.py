"""Rollouts with transformers' generate: works everywhere, the reference for faster engines."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, ContextManager

import torch
from rich.progress import Progress
from transformers import LogitsProcessorList

from grpoflow.progress import bar_draws
from grpoflow.rollout.base import Completion, Messages, SamplingParams
from grpoflow.rollout.seeded import SeededSampling

log = logging.getLogger("grpoflow.rollout")


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16, progress: bool = True,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, generate: Callable | None = None):
        """generate: what runs model.generate; the trainer's policy passes its own, which gathers a
        sharded model's weights for the call (FSDP2: Policy.generate)."""
        self.model = model
        self._generate = generate or model.generate
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.autocast = autocast
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """seeds: one per prompt; its completions then come from its own generator, whatever else
        is in the batch (grpoflow/rollout/seeded.py)."""
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        return self.generate_ids([self.tokenizer(t, add_special_tokens=False).input_ids for t in texts], params, seeds)

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[Completion]]:
        """generate for prompts already tokenized (the next turn of a multi-turn episode)."""
        results: list[list[Completion]] = []
        was_training = self.model.training
        self.model.eval()  # no dropout, and no gradient checkpointing, while sampling
        try:
            with Progress(disable=not self.progress, transient=True) as progress:
                task = progress.add_task(f"generating ({self.name})", total=len(prompt_ids))
                lines = self.progress and not bar_draws(progress.console)  # where the bar does not draw: a log line
                started = time.monotonic()
                for start in range(0, len(prompt_ids), self.batch_size):
                    batch = prompt_ids[start:start + self.batch_size]
                    if params.seed is not None:
                        torch.manual_seed(params.seed + start)
                    batch_seeds = None if seeds is None else seeds[start:start + self.batch_size]
                    results.extend(self._generate_batch(batch, params, batch_seeds))
                    progress.advance(task, len(batch))
                    if lines:
                        log.info("generating (%s): %d of %d prompts done (%.0fs)", self.name, start + len(batch),
                                 len(prompt_ids), time.monotonic() - started)
        finally:
            self.model.train(was_training)
        return results

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[list[int]], params: SamplingParams,
                        seeds: list[int] | None) -> list[list[Completion]]:
        keep = params.truncate_prompt_tokens
        truncated = [keep is not None and len(ids) > keep for ids in prompt_ids]
        prompt_ids = [ids[-keep:] if keep else ids for ids in prompt_ids]
        input_ids, attention_mask = left_pad(prompt_ids, self.tokenizer.pad_token_id, self.model.device)  # [B, P]
        sampling = {"do_sample": False} if params.greedy else {
            "temperature": params.temperature, "top_p": params.top_p,
            # top_k 0, not None: None lets transformers apply its default of 50
            "top_k": params.top_k, "min_p": params.min_p or None, "do_sample": True}
        seeded, copies = None, params.n
        if seeds is not None and not params.greedy:
            # generate runs greedy over the sampler's choices, on n copies of each prompt
            seeded = SeededSampling(seeds, params, input_ids.device)
            sampling = {"logits_processor": LogitsProcessorList([seeded]), "do_sample": False}
            input_ids = input_ids.repeat_interleave(params.n, dim=0)  # [B*n, P]
            attention_mask = attention_mask.repeat_interleave(params.n, dim=0)  # [B*n, P]
            copies = 1
        with self.autocast():
            out = self._generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=params.max_tokens,
                num_return_sequences=copies, repetition_penalty=params.repetition_penalty,
                min_new_tokens=params.max_tokens if params.ignore_eos else None,
                pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                output_scores=params.logprobs and seeded is None, return_dict_in_generate=True, **sampling)
        generated = out.sequences[:, input_ids.shape[1]:]  # [B*n, T]
        logprobs = None
        if params.logprobs and seeded is not None:
            logprobs = torch.stack(seeded.logprobs, dim=1)  # [B*n, T], under the processed distribution
        elif params.logprobs:
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


def transformers_engine(model_path: str, *, batch_size: int, progress: bool) -> HFEngine:
    """An engine on the model in `model_path` (evaluation, a rollout server without vLLM):
    bfloat16 on a GPU, float32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    log.info("rollout engine: transformers generate on %s (%s)", device, str(dtype).removeprefix("torch."))
    return HFEngine(model, tokenizer, batch_size=batch_size, progress=progress)
