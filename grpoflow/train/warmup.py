"""Format warm-up: a short supervised pass that teaches the answer format before GRPO.

GRPO learns from differences inside a group. SmolLM2-135M-Instruct wrote the format 0 times in
1,319 GSM8K problems: every completion earns the same format reward, advantages are all zero,
and nothing is learnt. A few hundred worked solutions rendered as
<reasoning>...</reasoning><answer>...</answer> make the format appear some of the time.

With rollout.environment: python_tool the worked examples use the tool: the model's first turn is
a ```python block that prints the solution's calculations (GSM8K's "48/2 = 24"), the tool's
message is the sandbox's real output, and the second turn is the formatted solution. The loss
covers the model's two turns, not the tool's message, as GRPO's does. A solution without a
calculation to take is left out.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from grpoflow.answer_format import format_answer  # strict_format's layout, final newline included
from grpoflow.config import FormatWarmupConfig
from grpoflow.environments import SingleTurn
from grpoflow.progress import Heartbeat
from grpoflow.rollout import RolloutEngine, SamplingParams
from grpoflow.rollout.episodes import ToolMessages, run_episodes
from grpoflow.train.logps import labelled_nll
from grpoflow.train.policy import make_scaler
from grpoflow.verifiers.verdicts import in_format

log = logging.getLogger("grpoflow.train")


def format_rate(engine: RolloutEngine, prompts: list, max_tokens: int, env=None,
                max_turns: int = 1) -> dict[str, float]:
    """Share of greedy completions in the strict and the soft format. With a multi-turn environment
    (python_tool) each prompt plays a whole episode, and its last turn is judged, as the rewards and
    the evaluation judge it: a first turn that calls the tool is not an answer out of format."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    episodes = run_episodes(engine, env or SingleTurn(), [{"prompt": p} for p in prompts], params,
                            max_turns=max_turns)
    texts = [g[0].final_text for g in episodes]
    return {name: sum(in_format(texts, strict=strict)) / len(texts)
            for name, strict in (("strict_format", True), ("soft_format", False))}


def warmup_learning_rate(cfg: FormatWarmupConfig, adapters: bool) -> float:
    """grpo.warmup.learning_rate, or the rate for what trains: LoRA adapters 1e-3, a whole model 2e-5."""
    if cfg.learning_rate is not None:
        return cfg.learning_rate
    return 1e-3 if adapters else 2e-5


def run_format_warmup(policy, engine: RolloutEngine, train_rows: list[dict[str, Any]], heldout_prompts: list,
                      cfg: FormatWarmupConfig, *, max_tokens: int, max_prompt_length: int, seed: int,
                      env=None, max_turns: int = 1, kernels: str = "auto") -> dict[str, Any]:
    """env: the rollout environment; python_tool makes the worked examples call the tool, and the
    format rates before and after play episodes of up to max_turns (rollout.max_turns). kernels:
    grpo.kernels, the log-prob path of the cross-entropy too (without the [B, L, V] logits)."""
    rows = [r for r in train_rows if r.get("solution")]
    tool = env is not None and env.name == "python_tool"
    tool_turns: dict[int, tuple[str, str]] = {}  # row index -> (first turn, tool message)
    if tool:
        candidates = [r for r in rows if tool_code(r["solution"])][: cfg.rows]
        with ThreadPoolExecutor(max_workers=8) as pool:  # each run waits on a sandboxed child
            turns = list(pool.map(lambda r: tool_turn(env, r), candidates))
        rows = [r for r, t in zip(candidates, turns) if t is not None]
        tool_turns = dict(enumerate(t for t in turns if t is not None))
    rows = rows[: cfg.rows]
    if not rows:
        log.warning("format warm-up skipped: no training row has a worked solution (column 'solution')%s",
                    " with a calculation the python tool runs" if tool else "")
        return {"skipped": "no worked solutions"}
    with Heartbeat(log, "format warm-up") as heartbeat:  # no bar: a line at least every 30 s, terminal or not
        rate = functools.partial(format_rate, engine, heldout_prompts, max_tokens, env, max_turns)
        return _warmup(policy, engine, rows, tool_turns, heldout_prompts, cfg, max_tokens, max_prompt_length, seed,
                       heartbeat, kernels, rate)


def _warmup(policy, engine, rows, tool_turns, heldout_prompts, cfg, max_tokens, max_prompt_length, seed, heartbeat,
            kernels, rate):
    started = time.perf_counter()
    heartbeat.phase(f"format rate before, on {len(heldout_prompts)} held-out prompts")
    before = rate()
    log.info("format warm-up: %d rows x %d epoch(s); strict format before: %.0f%%", len(rows), cfg.epochs,
             100 * before["strict_format"])
    tokenizer = policy.tokenizer
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=warmup_learning_rate(cfg, policy.is_peft))
    scaler = make_scaler(policy)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    policy.model.train()
    batches = math.ceil(len(rows) / cfg.batch_size)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            heartbeat.phase(f"epoch {epoch + 1} of {cfg.epochs}, batch {start // cfg.batch_size + 1} of {batches}")
            index = order[start:start + cfg.batch_size]
            batch = [rows[i] for i in index]
            turns = [tool_turns.get(i) for i in index]
            input_ids, attention_mask, labels = _sft_batch(tokenizer, batch, max_prompt_length, max_tokens, policy.device,
                                                           turns)
            with policy.autocast():  # every process the same rows: under FSDP2 the average is any one's gradient
                loss = policy.run(labelled_nll, input_ids, attention_mask, labels, kernels=kernels)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        log.info("format warm-up: epoch %d of %d, loss %.3f (%.0fs)", epoch + 1, cfg.epochs,
                 sum(losses[-batches:]) / batches, time.perf_counter() - started)
    heartbeat.phase(f"format rate after, on {len(heldout_prompts)} held-out prompts")
    engine.sync_weights(policy, 0)  # an engine with its own copy of the weights (vLLM) samples the new ones
    after = rate()
    report = {"rows": len(rows), "epochs": cfg.epochs, "steps": len(losses), "tool_examples": len(tool_turns),
              "learning_rate": warmup_learning_rate(cfg, policy.is_peft),
              "loss_first": losses[0], "loss_last": losses[-1],
              "format_strict_before": before["strict_format"], "format_strict_after": after["strict_format"],
              "format_soft_before": before["soft_format"], "format_soft_after": after["soft_format"],
              "eval_prompts": len(heldout_prompts), "seconds": round(time.perf_counter() - started, 1)}
    log.info("format warm-up done in %.0fs: loss %.3f -> %.3f; strict format %.0f%% -> %.0f%% on %d held-out prompts",
             report["seconds"], report["loss_first"], report["loss_last"], 100 * before["strict_format"],
             100 * after["strict_format"], len(heldout_prompts))
    return report




# A calculation in a GSM8K solution, as the text keeps it once the calculator annotations are gone:
# "48/2 = 24", "0.2 x 50 = $10", "100 - 50 - 30 - 15 = $5"
_CALCULATION = re.compile(r"(?<![\w.])(\(?\d[\d.,]*\)?(?:\s*[-+*/x\u00d7]\s*\(?\d[\d.,]*\)?)+)\s*=\s*\$?-?\d")


def tool_code(solution: str) -> str | None:
    """The first turn of a worked example with the tool: a ```python block printing each of the
    solution's calculations; None when it has none."""
    lines = [re.sub(r"(?<=\d),(?=\d{3})", "", e).replace("x", "*").replace("\u00d7", "*")
             for e in _CALCULATION.findall(solution)]
    if not lines:
        return None
    return "```python\n" + "\n".join(f"print({e})" for e in lines) + "\n```"


def tool_turn(env, row: dict[str, Any]) -> tuple[str, str] | None:
    """(the model's first turn, the tool's real answer to it); None if the code fails to run."""
    code = tool_code(row["solution"])
    observation, _, parts = env.step([*row["prompt"], {"role": "assistant", "content": code}], code)
    return None if observation is None or parts.get("tool_errors") else (code, observation)


def _sft_batch(tokenizer, rows, max_prompt_length: int, max_tokens: int, device, turns=None):
    """[prompt | target + EOS], right-padded; labels -100 on the prompt and the padding. turns: per
    row, None or (first turn, tool message): then the target is [first turn + EOS | tool message |
    solution + EOS], labels -100 on the tool message too, within max_tokens in all."""
    seqs, label_rows = [], []
    eos = tokenizer.eos_token_id
    tool = ToolMessages(tokenizer) if turns and any(turns) else None
    for r, turn in zip(rows, turns or [None] * len(rows)):
        prompt = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids[-max_prompt_length:]
        answer_ids = tokenizer(format_answer(r["solution"], r["answer"]), add_special_tokens=False).input_ids
        if turn is None:
            target_ids = answer_ids[: max_tokens - 1] + [eos]
            target_labels = target_ids
        else:
            code_ids = tokenizer(turn[0], add_special_tokens=False).input_ids + [eos]
            tool_ids = tool.ids(turn[1], after_token=eos)
            target_ids = (code_ids + tool_ids + answer_ids)[: max_tokens - 1] + [eos]
            target_labels = [t if not (len(code_ids) <= i < len(code_ids) + len(tool_ids)) else -100
                             for i, t in enumerate(target_ids)]
        seqs.append(prompt_ids + target_ids)
        label_rows.append([-100] * len(prompt_ids) + target_labels)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, L]
    for i, (s, lab) in enumerate(zip(seqs, label_rows)):
        input_ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(lab)
        attention_mask[i, :len(s)] = 1
    return input_ids.to(device), attention_mask.to(device), labels.to(device)
