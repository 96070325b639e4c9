"""Evaluation: models answer the held-out questions; verifiers and rewards grade them.

    for each model (base, trained, ...):
        generate greedy (pass@1) [+ k samples: pass@k, maj@k] -> verify -> score -> write

Verifying and scoring the greedy completions is grpoflow.evaluation.score_greedy, which evaluation
during training (grpo.eval_strategy) calls too.
    side-by-side table of every model on the same prompts and seeds

Per-sample results go to <label>.samples.parquet, each model's figures to <label>.json,
everything to summary.json and comparison.md. A model already evaluated on the same rows
with the same settings is not evaluated again, so an interrupted run resumes there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grpoflow.answer_format import ANSWER_CLOSE, ANSWER_OPEN
from grpoflow.atomic import atomic_folder
from grpoflow.config import EvalConfig, RolloutConfig
from grpoflow.environments import make_environment
from grpoflow.evaluation import score_greedy
from grpoflow.hashing import cache_key, file_sha256, model_fingerprint
from grpoflow.progress import Heartbeat, bar_draws
from grpoflow.rewards import RewardSet, extract_answer, parse_number
from grpoflow.rollout import SamplingParams
from grpoflow.rollout.episodes import run_episodes
from grpoflow.rollout.load import make_engine
from grpoflow.verifiers.verdicts import answer_correct

log = logging.getLogger("grpoflow.evaluate")

# Bump when the figures change for the same inputs: earlier results stop counting as done.
EVAL_VERSION = 1
PROMPT_TOKENS = 1024  # what vLLM leaves for a prompt beside eval.max_new_tokens (rollout.max_model_len: null)


@dataclass
class EvalReport:
    output_dir: str
    models: dict[str, dict[str, Any]]  # label -> figures
    markdown: str

    def as_json(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "models": self.models}


def run_evaluate(cfg: EvalConfig, heldout: Path, models: dict[str, str], *, rollout: RolloutConfig = RolloutConfig(),
                 answer_type: str = "number") -> EvalReport:
    """`models` maps a label ('base', 'trained') to a model folder or Hub id."""
    rows = pq.read_table(heldout).to_pylist()
    rows = rows[: cfg.max_samples] if cfg.max_samples else rows
    scorable = [r for r in rows if (r.get("answer") or "").strip()]
    skipped = len(rows) - len(scorable)
    if skipped:
        log.warning("%d of %d held-out rows have no gold answer: counted, not scored", skipped, len(rows))
    if not scorable:
        raise ValueError(f"{heldout}: none of the {len(rows)} held-out rows has a gold answer to score against")

    key = _run_key(cfg, heldout, models, rollout, answer_type)
    out = Path(cfg.output_dir) / key[:16]
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, Any]] = {}
    for label, path in models.items():
        # A model's figures do not depend on what it is compared with: each is kept once under
        # models/<key>/ (key: held-out set, settings, the model's files), so the base evaluated
        # once serves every later comparison, and an interrupted comparison resumes per model.
        model_dir = Path(cfg.output_dir) / "models" / _run_key(cfg, heldout, {"": path}, rollout, answer_type)[:16]
        done = model_dir / "figures.json"
        if done.is_file():
            log.info("%s: evaluated earlier (%s)", label, model_dir)
            figures[label] = json.loads(done.read_text())
        else:
            with atomic_folder(model_dir) as tmp_dir, Heartbeat(log, f"evaluating {label}", enabled=not bar_draws()):
                figures[label] = _evaluate_model(cfg, rollout, label, path, scorable, tmp_dir, answer_type)
                figures[label]["skipped_no_answer"] = skipped
                (tmp_dir / "figures.json").write_text(json.dumps(figures[label], indent=2) + "\n")
            figures[label] = json.loads(done.read_text())  # as a later run will read them (lists, not tuples)
        (out / f"{label}.json").write_text(json.dumps(figures[label], indent=2) + "\n")
        for name in ("samples", "sampled"):
            if (model_dir / f"{name}.parquet").is_file():
                shutil.copyfile(model_dir / f"{name}.parquet", out / f"{label}.{name}.parquet")

    markdown = comparison_table(figures)
    (out / "comparison.md").write_text(markdown + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"heldout": str(heldout), "rows": len(rows), "scored": len(scorable), "config": cfg.model_dump(mode="json"),
         "models": figures}, indent=2) + "\n")
    return EvalReport(str(out), figures, markdown)


def _evaluate_model(cfg: EvalConfig, rollout: RolloutConfig, label: str, path: str, rows: list[dict],
                    out: Path, answer_type: str) -> dict[str, Any]:
    started = time.perf_counter()
    engine = make_engine(rollout, path, batch_size=cfg.batch_size, seed=cfg.seed,
                         max_model_len=rollout.max_model_len or PROMPT_TOKENS + cfg.max_new_tokens)
    env = make_environment(rollout)  # the trained model's environment (rollout.environment), for base and trained alike
    log.info("%s: %d held-out questions, greedy, up to %d new tokens (%s engine, %s)", label, len(rows),
             cfg.max_new_tokens, engine.name, env.name)
    greedy = [c[0] for c in run_episodes(engine, env, rows, SamplingParams(max_tokens=cfg.max_new_tokens,
                                                                           temperature=0.0, seed=cfg.seed),
                                         max_turns=rollout.max_turns)]
    gen_seconds = time.perf_counter() - started
    scored, table = score_greedy(rows, greedy, RewardSet(cfg.reward_funcs), answer_type)
    tokens = sum(table["completion_tokens"])
    figures: dict[str, Any] = {"model": path, **scored,
                               "generation_tokens_per_second": tokens / gen_seconds if gen_seconds else None}
    pq.write_table(pa.table(table), out / "samples.parquet")

    if cfg.num_samples:
        figures.update(_sampled(cfg, engine, env, rollout.max_turns, label, rows, table["answer"], out, answer_type))
    figures["seconds"] = round(time.perf_counter() - started, 1)
    log.info("%s: accuracy %.1f%% (last number %.1f%%), strict format %.1f%%, %.0f tokens on average",
             label, 100 * figures["accuracy"], 100 * figures["accuracy_last_number"],
             100 * figures["format_strict"], figures["mean_completion_tokens"])
    return figures


def _sampled(cfg: EvalConfig, engine, env, max_turns: int, label: str, rows: list[dict], golds: list[str], out: Path,
             answer_type: str) -> dict[str, Any]:
    k = cfg.num_samples
    log.info("%s: %d samples per question at temperature %s for pass@%d / maj@%d", label, k, cfg.temperature, k, k)
    groups = run_episodes(engine, env, rows, SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                            n=k, seed=cfg.seed), max_turns=max_turns)
    pass_at_k, majority, per_sample = [], [], []
    records: dict[str, list] = {"question_index": [], "sample": [], "completion": [], "correct": []}
    for i, (group, gold) in enumerate(zip(groups, golds)):
        verdicts = [bool(answer_correct(c.final_text, gold, answer_type)) for c in group]
        pass_at_k.append(any(verdicts))
        per_sample.extend(verdicts)
        majority.append(majority_correct([c.final_text for c in group], gold, answer_type))
        for j, (c, v) in enumerate(zip(group, verdicts)):
            records["question_index"].append(i)
            records["sample"].append(j)
            records["completion"].append(c.text)
            records["correct"].append(v)
    pq.write_table(pa.table(records), out / "sampled.parquet")
    return {f"pass@{k}": _mean(pass_at_k), f"maj@{k}": _mean(majority), "sampled_accuracy": _mean(per_sample)}


def majority_correct(texts: list[str], gold: str, answer_type: str) -> bool:
    """The most common extracted answer (ties: the first seen) equals the gold answer."""
    answers = [extract_answer(t) for t in texts]
    if answer_type == "number":
        answers = [parse_number(a) for a in answers]
    votes = Counter(a for a in answers if a)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]
    return bool(answer_correct(f"{ANSWER_OPEN}{winner}{ANSWER_CLOSE}", gold, answer_type))


def comparison_table(figures: dict[str, dict[str, Any]]) -> str:
    labels = list(figures)
    rows = [("questions scored", lambda f: f"{f['scored']:,}"),
            ("accuracy (`<answer>`)", lambda f: _pct_ci(f["accuracy"], f["accuracy_ci95"])),
            ("accuracy (last number)", lambda f: _pct_ci(f["accuracy_last_number"], f["accuracy_last_number_ci95"])),
            ("strict format", lambda f: _pct_ci(f["format_strict"], f.get("format_strict_ci95"))),
            ("soft format", lambda f: _pct_ci(f["format_soft"], f.get("format_soft_ci95"))),
            ("mean completion tokens", lambda f: f"{f['mean_completion_tokens']:.0f}"),
            ("cut at max tokens", lambda f: f"{100 * f['truncated']:.1f}%"),
            ("reward (sum)", lambda f: f"{f['reward']:.3f}")]
    names = sorted({n for f in figures.values() for n in f["rewards"]})
    rows += [(f"rewards/{n}", lambda f, n=n: _num(f["rewards"].get(n))) for n in names]
    extra = sorted({k for f in figures.values() for k in f if k.startswith(("pass@", "maj@"))})
    rows += [(k, lambda f, k=k: f"{100 * f[k]:.1f}%" if k in f else "-") for k in extra]
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {name} | " + " | ".join(fmt(figures[label]) for label in labels) + " |" for name, fmt in rows]
    return "\n".join(lines)


def _run_key(cfg: EvalConfig, heldout: Path, models: dict[str, str], rollout: RolloutConfig, answer_type: str) -> str:
    return cache_key({"version": EVAL_VERSION, "heldout": file_sha256(heldout),
                      "config": cfg.model_dump(mode="json", exclude={"output_dir"}),
                      "rollout": _rollout_key(rollout), "answer_type": answer_type,
                      "models": {label: model_fingerprint(path) for label, path in models.items()}})


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _pct_ci(p: float, ci: tuple[float, float] | None) -> str:
    """'53.1% [36.4, 69.2]'; without an interval (figures kept from before it was computed) the rate alone."""
    return f"{100 * p:.1f}%" + ("" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rollout_key(rollout: RolloutConfig) -> dict[str, Any]:
    """The rollout settings an evaluation depends on; the environment's only when it is not the
    default, so that evaluations from before rollout.environment keep their keys."""
    settings = rollout.model_dump(mode="json")
    if rollout.environment == "single_turn":
        del settings["environment"], settings["max_turns"]
    return settings
