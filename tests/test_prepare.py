"""Data prep on real files: every bad-input path ends in rejects.parquet or a clear error."""

import json
import re
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from grpoflow.config import DataConfig
from grpoflow.sources import SourceError
from stages.prepare import REJECT_REASONS, DataError, Manifest, run_prepare


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def gsm(q: str, a: str) -> dict:
    return {"question": q, "answer": f"Work for {q}.\n#### {a}"}


def cfg(tmp_path: Path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), output_dir=tmp_path / "out", **kw)


def rejects(manifest: Manifest) -> list[dict]:
    return pq.read_table(manifest.rejects_path).to_pylist()


def assert_accounted(manifest: Manifest):
    """Every row read is in a split or in the rejects (rows cut by a row limit too): in = out + rejects."""
    kept = sum(s["rows"] for s in manifest.splits.values())
    assert kept + manifest.rejected["total"] == sum(manifest.source["rows_in"].values())
    for split, info in manifest.splits.items():
        limited = [r for r in rejects(manifest) if r["split"] == split and r["reason"] == "over_max_rows"]
        assert info["limited"] == len(limited)
    assert pq.read_table(manifest.train_path).num_rows == manifest.splits["train"]["rows"]
    assert pq.read_table(manifest.heldout_path).num_rows == manifest.splits["heldout"]["rows"]
    assert pq.read_table(manifest.rejects_path).num_rows == manifest.rejected["total"]


def test_packaged_gsm8k(tmp_path):
    manifest = run_prepare(DataConfig(output_dir=tmp_path / "out"))
    assert manifest.source["rows_in"] == {"train": 7473, "test": 1319}
    assert manifest.splits["train"]["rows"] + manifest.rejected["by_split"].get("train", 0) == 7473
    assert manifest.splits["heldout"]["rows"] + manifest.rejected["by_split"].get("heldout", 0) == 1319
    assert_accounted(manifest)
    first = pq.read_table(manifest.train_path).slice(0, 1).to_pylist()[0]
    assert first["question"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first["answer"] == "72"
    assert first["solution"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    assert first["prompt"][0]["role"] == "system" and "<reasoning>" in first["prompt"][0]["content"]
    assert first["prompt"][1] == {"role": "user", "content": first["question"]}
    assert first["origin"].endswith("gsm8k/train.jsonl:1")
    answers = pq.read_table(manifest.train_path, columns=["answer"]).column("answer").to_pylist()
    assert "1080" in answers and not any("," in a for a in answers)  # '1,080' normalised
    assert (Path(manifest.output_dir) / "lengths.png").stat().st_size > 1000


def test_same_inputs_again_is_a_no_op(tmp_path):
    source = write_jsonl(tmp_path / "d" / "train.jsonl", [gsm(f"q{i}?", str(i)) for i in range(20)])
    first = run_prepare(cfg(tmp_path, source))
    mtime = first.train_path.stat().st_mtime_ns
    again = run_prepare(cfg(tmp_path, source))
    assert again.cached and not first.cached
    assert again.output_dir == first.output_dir and again.train_path.stat().st_mtime_ns == mtime
    # a changed input or a changed key is new work, in a new folder
    write_jsonl(source, [gsm(f"q{i}?", str(i)) for i in range(21)])
    changed = run_prepare(cfg(tmp_path, source))
    assert not changed.cached and changed.output_dir != first.output_dir
    other = run_prepare(cfg(tmp_path, source, seed=7))
    assert not other.cached and other.output_dir != changed.output_dir


def test_every_bad_row_is_kept_with_its_reason(tmp_path):
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", [
        gsm("How many apples?", "3"),                                    # 1 ok
        '{"question": "broken", ',                                       # 2 invalid JSON
        '["a", "list"]',                                                 # 3 not an object
        {"answer": "x\n#### 4"},                                         # 4 no question
        {"question": "   ", "answer": "x\n#### 4"},                     # 5 empty question
        {"question": "No answer?", "answer": ""},                        # 6 empty answer
        {"question": "No answer key?"},                                  # 7 answer missing
        {"question": "No marker?", "answer": "it is 5"},                 # 8 no ####
        {"question": "Empty final?", "answer": "work\n#### "},           # 9 nothing after ####
        {"question": "Words?", "answer": "work\n#### five"},             # 10 not a number
        {"question": "Leak?", "answer": "w\n#### 3 + 4 = 7 because we add the three apples to four more pears"},
        {"question": "Pasted #### 7", "answer": "w\n#### 7"},            # 12 question holds the marker
        gsm("How many  APPLES?", "3"),                                   # 13 duplicate of 1
        gsm("Pears?", "1"),                                              # 14 conflicting ...
        gsm("pears", "2"),                                               # 15 ... duplicates
        gsm("What is 6 times 7?", "42"),                                 # 16 also in held-out
        gsm("Money?", "$1,250.50"),                                      # 17 ok, normalised
    ])
    write_jsonl(d / "test.jsonl", [gsm("what is 6 times 7", "42"), gsm("Held out?", "-8")])
    manifest = run_prepare(cfg(tmp_path, d))
    by_line = {r["origin"].rsplit(":", 1)[1]: r for r in rejects(manifest)}
    expected = {"2": "unreadable", "3": "unreadable", "4": "missing_question", "5": "missing_question",
                "6": "missing_answer", "7": "missing_answer", "8": "no_final_answer", "9": "no_final_answer",
                "10": "unparsable_answer", "11": "answer_gives_away_reasoning", "12": "question_contains_solution",
                "13": "duplicate", "14": "conflicting_duplicate", "15": "conflicting_duplicate",
                "16": "overlaps_heldout"}
    assert {line: r["reason"] for line, r in by_line.items()} == expected
    assert set(manifest.rejected["by_reason"]) <= set(REJECT_REASONS)
    assert by_line["2"]["raw"] == '{"question": "broken", '
    assert by_line["2"]["detail"].startswith("invalid JSON")
    assert by_line["13"]["detail"] == f"same question as {d / 'train.jsonl'}:1"
    assert by_line["16"]["detail"] == f"same question as held-out {d / 'test.jsonl'}:1"
    assert json.loads(by_line["10"]["raw"]) == {"question": "Words?", "answer": "work\n#### five"}
    train = pq.read_table(manifest.train_path).to_pylist()
    assert [(r["question"], r["answer"]) for r in train] == [("How many apples?", "3"), ("Money?", "1250.5")]
    assert manifest.splits["heldout"]["rows"] == 2
    assert_accounted(manifest)


def test_a_missing_column_is_a_config_error_naming_it(tmp_path):
    source = write_jsonl(tmp_path / "q.jsonl", [{"problem": f"{i}+1?", "solution": f"#### {i + 1}"}
                                                 for i in range(4)] + [{"problem": "1+1?", "solution": "#### 2"}])
    with pytest.raises(DataError) as e:
        run_prepare(cfg(tmp_path, source))
    assert str(e.value) == (f"data.question_column: column 'question' is not in {source}; its columns are "
                            "problem, solution. Set data.question_column to the right one.")
    manifest = run_prepare(cfg(tmp_path, source, question_column="problem", answer_column="solution"))
    assert manifest.splits["train"]["rows"] + manifest.splits["heldout"]["rows"] == 4
    assert manifest.rejected["by_reason"] == {"duplicate": 1}


def test_plain_answers_and_seeded_split(tmp_path):
    rows = [{"q": f"Question number {i}", "a": f"answer {i}"} for i in range(100)]
    source = write_jsonl(tmp_path / "plain.jsonl", rows)
    c = cfg(tmp_path, source, question_column="q", answer_column="a", answer_format="plain",
            answer_type="text", heldout_fraction=0.2, system_prompt="")
    manifest = run_prepare(c)
    assert (manifest.splits["train"]["rows"], manifest.splits["heldout"]["rows"]) == (80, 20)
    assert "seeded split: 20% of the train rows (data.seed 42)" in manifest.heldout_from
    heldout = pq.read_table(manifest.heldout_path).to_pylist()
    assert heldout[0]["prompt"] == [{"role": "user", "content": heldout[0]["question"]}]
    assert heldout[0]["solution"] is None
    # the same seed gives the same split; another seed another one
    c2 = c.model_copy(update={"output_dir": tmp_path / "out2"})
    assert pq.read_table(run_prepare(c2).heldout_path).to_pylist() == heldout
    c3 = c.model_copy(update={"output_dir": tmp_path / "out3", "seed": 1})
    assert pq.read_table(run_prepare(c3).heldout_path).to_pylist() != heldout


def test_row_limits_are_counted(tmp_path):
    source = write_jsonl(tmp_path / "d" / "train.jsonl", [gsm(f"q{i}", str(i)) for i in range(30)])
    write_jsonl(tmp_path / "d" / "test.jsonl", [gsm(f"t{i}", str(i)) for i in range(10)])
    manifest = run_prepare(cfg(tmp_path, source.parent, max_train_rows=12, max_heldout_rows=4))
    assert manifest.splits["train"]["rows"] == 12 and manifest.splits["train"]["limited"] == 18
    assert manifest.splits["heldout"]["rows"] == 4 and manifest.splits["heldout"]["limited"] == 6
    assert_accounted(manifest)


def test_parquet_shards_csv_and_arrow(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": i} for i in range(10)]  # integer answers, as CSV/Parquet give
    d = tmp_path / "hub_layout" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), d / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:8]), d / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:]), d / "test-00000-of-00001.parquet")
    m = run_prepare(cfg(tmp_path, d.parent, answer_format="plain"))
    assert (m.splits["train"]["rows"], m.splits["heldout"]["rows"]) == (8, 2)
    assert [f["rows"] for f in m.source["files"]] == [4, 4, 2]

    csv = tmp_path / "rows.csv"
    csv.write_text('question,answer\n"Q, with comma?",7\nQ2?,8,extra\nQ3?,"1,000"\n')
    m = run_prepare(cfg(tmp_path, csv, answer_format="plain", heldout_fraction=0.5))
    assert m.rejected["by_reason"] == {"unreadable": 1}
    bad = rejects(m)[0]
    assert bad["origin"] == f"{csv}:3" and bad["raw"] == "Q2?,8,extra"
    assert bad["detail"] == "expected 2 columns, got 3"
    kept = pq.read_table(m.train_path).to_pylist() + pq.read_table(m.heldout_path).to_pylist()
    assert sorted(r["answer"] for r in kept) == ["1000", "7"]

    for name, write in (("rows.arrow", lambda t, p: feather.write_feather(t, p)),
                        ("stream.arrow", lambda t, p: p.write_bytes(_ipc_stream(t)))):
        f = tmp_path / name
        write(pa.Table.from_pylist(rows), f)
        m = run_prepare(cfg(tmp_path, f, answer_format="plain"))
        assert m.splits["train"]["rows"] + m.splits["heldout"]["rows"] == 10


def _ipc_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_unreadable_sources_name_the_file(tmp_path):
    broken = tmp_path / "d" / "train.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=rf"^{broken}: cannot be read as parquet: "):
        run_prepare(cfg(tmp_path, broken))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("hi")
    (tmp_path / "e" / "validation.jsonl").write_text("{}\n")
    with pytest.raises(SourceError) as e:
        run_prepare(cfg(tmp_path, tmp_path / "e"))
    assert str(e.value).startswith(f"data.source: {tmp_path / 'e'} has no 'train' split")
    assert str(e.value).endswith("found: validation.jsonl. Set data.train_split, or point data.source at one file.")
    with pytest.raises(SourceError, match="does not exist"):
        run_prepare(cfg(tmp_path, "./nope.jsonl"))
    bad_json = tmp_path / "arr.json"
    bad_json.write_text('[{"question": "a", "answer": "#### 1"},\n  {oops}]')
    with pytest.raises(SourceError, match=rf"^{bad_json}: not valid JSON at line 2, column 4"):
        run_prepare(cfg(tmp_path, bad_json))


def test_hub_ids_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as e:
        run_prepare(cfg(tmp_path, "nobody-here/no-such-dataset"))
    assert str(e.value).startswith("data.source: 'nobody-here/no-such-dataset' is not a local path, and loading "
                                   "it from the Hugging Face Hub failed")


def test_reasoning_gym(tmp_path):
    c = cfg(tmp_path, "reasoning_gym:basic_arithmetic", answer_format="plain", reasoning_gym={"size": 50})
    m = run_prepare(c)
    assert m.splits["train"]["rows"] + m.splits["heldout"]["rows"] + m.rejected["total"] == 50
    row = pq.read_table(m.train_path).slice(0, 1).to_pylist()[0]
    assert json.loads(row["metadata"])["source_dataset"] == "basic_arithmetic"
    assert row["origin"].startswith("reasoning_gym:basic_arithmetic#")
    with pytest.raises(SourceError, match="reasoning-gym has no task 'countdwn'; did you mean countdown"):
        run_prepare(cfg(tmp_path, "reasoning_gym:countdwn"))


def test_reasoning_gym_options_reach_the_generator_and_the_cache_key(tmp_path):
    one_digit = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    m = run_prepare(cfg(tmp_path, "reasoning_gym:chain_sum", answer_format="plain",
                        reasoning_gym={"size": 40, "options": one_digit}))
    questions = pq.read_table(m.train_path).column("question").to_pylist()
    assert all(len(re.findall(r"\d+", q)) == 2 and max(map(int, re.findall(r"\d+", q))) < 10 for q in questions)
    wider = run_prepare(cfg(tmp_path, "reasoning_gym:chain_sum", answer_format="plain",
                            reasoning_gym={"size": 40, "options": {**one_digit, "max_digits": 3}}))
    assert wider.output_dir != m.output_dir  # other options, other rows: not the cached folder
    with pytest.raises(SourceError, match=r"data.reasoning_gym.options: reasoning-gym's chain_sum does not take "
                                          r"\{'digits': 3\}"):
        run_prepare(cfg(tmp_path, "reasoning_gym:chain_sum", reasoning_gym={"size": 40, "options": {"digits": 3}}))


def test_all_rows_rejected_says_what_to_change(tmp_path):
    with pytest.raises(DataError) as e:
        run_prepare(cfg(tmp_path, "reasoning_gym:countdown", reasoning_gym={"size": 20}))
    assert str(e.value) == ("data.source reasoning_gym:countdown: 0 train and 0 held-out rows left of 20 read "
                            "(no_final_answer: 20). If the answer column holds only the final answer, "
                            "set data.answer_format: plain.")


def test_an_interrupted_run_is_redone(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [gsm(f"q{i}", str(i)) for i in range(10)])
    done = run_prepare(cfg(tmp_path, source))
    # simulate a run killed while writing: the folder exists, the manifest does not
    out = Path(done.output_dir)
    os.remove(out / "manifest.json")
    (out / "train.parquet").write_bytes(b"half written")
    (out.parent / f"{out.name}.tmp-999").mkdir()
    again = run_prepare(cfg(tmp_path, source))
    assert not again.cached and again.output_dir == done.output_dir
    assert pq.read_table(again.train_path).num_rows == done.splits["train"]["rows"]
