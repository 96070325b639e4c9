"""The evaluation stage: real generate on a tiny model; the figures it reports, on hand-made cases."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpoflow.config import DataConfig, EvalConfig
from grpoflow.evaluation import wilson_interval
from grpoflow.verifiers.verdicts import answer_correct, last_number_correct
from stages.evaluate import comparison_table, majority_correct, run_evaluate
from stages.prepare import run_prepare


def heldout_file(tmp_path: Path, n: int = 5, missing: int = 0) -> Path:
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "question": f"What is {i} + {i}?", "answer": str(2 * i) if i >= missing else None,
             "solution": None, "origin": f"x:{i}", "metadata": None} for i in range(n)]
    path = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_evaluate_writes_samples_summary_and_resumes(tiny_model, tmp_path):
    cfg = EvalConfig(max_samples=4, max_new_tokens=6, batch_size=3, num_samples=2, output_dir=tmp_path / "eval")
    heldout = heldout_file(tmp_path, n=6, missing=1)
    report = run_evaluate(cfg, heldout, {"base": str(tiny_model), "again": str(tiny_model)})
    out = Path(report.output_dir)
    base = report.models["base"]
    assert base["scored"] == 3 and base["skipped_no_answer"] == 1  # first 4 rows, one without a gold answer
    samples = pq.read_table(out / "base.samples.parquet").to_pylist()
    assert [s["answer"] for s in samples] == ["2", "4", "6"]
    assert all(1 <= s["completion_tokens"] <= 6 for s in samples)
    assert set(samples[0]) >= {"completion", "correct", "correct_last_number", "rewards/correctness", "reward"}
    assert pq.read_table(out / "base.sampled.parquet").num_rows == 3 * 2
    assert {"pass@2", "maj@2", "sampled_accuracy"} <= set(base)
    # greedy decoding: the same model on the same prompts gives the same completions
    again = pq.read_table(out / "again.samples.parquet").column("completion").to_pylist()
    assert again == [s["completion"] for s in samples]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 3 and set(summary["models"]) == {"base", "again"}
    assert "| accuracy (`<answer>`) |" in (out / "comparison.md").read_text()  # a bare <answer> is an HTML tag to a renderer

    # a second run with the same inputs reads the results instead of generating again, per model:
    # the base alone, evaluated earlier, serves a comparison that adds another model
    cached = sorted((tmp_path / "eval" / "models").glob("*/samples.parquet"))
    assert len(cached) == 1  # 'base' and 'again' are the same model: evaluated once
    mtime = cached[0].stat().st_mtime_ns
    resumed = run_evaluate(cfg, heldout, {"base": str(tiny_model)})
    assert resumed.models["base"] == base
    assert cached[0].stat().st_mtime_ns == mtime


def test_an_interrupted_model_evaluation_leaves_nothing_that_passes_for_done(tiny_model, tmp_path, monkeypatch):
    from stages import evaluate as evaluate_stage

    cfg = EvalConfig(max_samples=2, max_new_tokens=4, num_samples=0, output_dir=tmp_path / "eval")
    heldout = heldout_file(tmp_path, n=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate_stage, "score_greedy", interrupted)  # after generation, before figures
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(cfg, heldout, {"base": str(tiny_model)})
    assert not list((tmp_path / "eval" / "models").glob("*/figures.json"))
    monkeypatch.undo()
    report = run_evaluate(cfg, heldout, {"base": str(tiny_model)})
    assert report.models["base"]["scored"] == 2
    assert [p.name.startswith(".tmp-") for p in (tmp_path / "eval" / "models").iterdir()] == [False]


def test_rows_without_gold_answers_are_not_scored(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="none of the 2 held-out rows has a gold answer"):
        run_evaluate(EvalConfig(max_samples=2, output_dir=tmp_path), heldout_file(tmp_path, n=2, missing=2),
                     {"base": str(tiny_model)})


def test_verdicts():
    good = "<reasoning>\n6 * 7\n</reasoning>\n<answer>\n42\n</answer>\n"
    assert answer_correct(good, "42") is True
    assert answer_correct("<answer>41</answer> no wait <answer>42</answer>", "42") is True
    assert answer_correct("<answer>42</answer> no wait <answer>41</answer>", "42") is False
    assert answer_correct("the answer is 42", "42") is False  # no tag: the format counts
    assert answer_correct("<answer>$1,250</answer>", "1250") is True
    assert answer_correct("<answer>-3.50</answer>", "-3.5") is True
    assert answer_correct("<answer>Paris</answer>", "paris", answer_type="text") is True
    assert answer_correct(good, None) is None
    assert last_number_correct("6 * 7 = 42. So she has 42 apples.", "42") is True
    assert last_number_correct("42 apples, minus 1 is 41.", "42") is False
    assert last_number_correct("It costs $1,080.", "1080") is True
    assert last_number_correct("", "5") is False


def test_majority_vote():
    texts = ["<answer>5</answer>", "<answer>7</answer>", "<answer>5.0</answer>", "no answer"]
    assert majority_correct(texts, "5", "number") is True
    assert majority_correct(texts, "7", "number") is False
    assert majority_correct(["nothing", "at all"], "5", "number") is False


def test_wilson_interval():
    lo, hi = wilson_interval(0, 32)
    assert lo == 0.0 and 0.10 < hi < 0.11  # 0 of 32 still allows up to ~10.7%
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_comparison_table_side_by_side():
    figures = {label: {"scored": 10, "accuracy": acc, "accuracy_ci95": (0.0, 0.5), "accuracy_last_number": 0.2,
                       "accuracy_last_number_ci95": (0.05, 0.5), "format_strict": fmt, "format_soft": fmt,
                       "mean_completion_tokens": 100.0, "truncated": 0.1, "reward": 1.0,
                       "rewards": {"correctness": 2 * acc}}
               for label, acc, fmt in (("base", 0.0, 0.0), ("trained", 0.3, 0.9))}
    table = comparison_table(figures).splitlines()
    assert table[0] == "| metric | base | trained |"
    assert "| strict format | 0.0% | 90.0% |" in table  # figures kept from before the format had intervals
    assert "| rewards/correctness | 0.000 | 0.600 |" in table
    for label, fmt in (("base", 0), ("trained", 17)):
        figures[label]["format_strict_ci95"] = wilson_interval(fmt, 32)
    assert "| strict format | 0.0% [0.0, 10.7] | 90.0% [36.4, 69.1] |" in comparison_table(figures).splitlines()


@pytest.mark.slow
def test_smollm2_on_gsm8k_has_no_format_yet(smollm2, tmp_path):
    """Behaviour: the base model never writes <answer> tags (0 of 1,319 on the GPU machine)."""
    manifest = run_prepare(DataConfig(output_dir=tmp_path / "data", max_heldout_rows=4))
    report = run_evaluate(EvalConfig(max_samples=4, max_new_tokens=96, output_dir=tmp_path / "eval"),
                          manifest.heldout_path, {"base": str(smollm2)})
    base = report.models["base"]
    assert base["format_strict"] == 0.0 and base["accuracy"] == 0.0
    assert base["mean_completion_tokens"] > 20  # it does answer, in prose
