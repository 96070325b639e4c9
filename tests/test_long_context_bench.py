"""benchmarks/long_context.py's smoke mode: a tiny random model, LoRA, completions forced to their
length, activation offload and forwards by token budget together, through the benchmark's own code."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def test_the_long_context_benchmark_runs_whole_steps_on_a_tiny_shape(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/long_context.py", "smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "long_context-ours-smoke.json").read_text())
    assert record["status"] == "ok" and record["offload_activations"] and record["max_tokens_per_forward"] == 96
    assert [s["completions/mean_length"] for s in record["steps"]] == [40, 40]  # ignore_eos: every token written
    assert all(s["memory/trainable_gib"] > 0 for s in record["steps"])
    assert "grpoflow.train: policy:" in done.stderr  # grpoflow's own log lines come out
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("final"))  # figures, not models


def test_decoded_tokens_repeat_with_their_log_probs_to_the_full_length(monkeypatch):
    """--decoded (memory only): what vLLM decoded, repeated in turn; every position keeps its own token's log-prob."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.long_context import repeat_to

    completion = SimpleNamespace(token_ids=(5, 6, 7), logprobs=[{5: -0.5}, {6: -1.5}, {7: -2.5}])
    repeat_to(completion, 8)
    assert completion.token_ids == [5, 6, 7, 5, 6, 7, 5, 6]
    assert [list(position) for position in completion.logprobs] == [[t] for t in completion.token_ids]
    assert [next(iter(position.values())) for position in completion.logprobs][3:6] == [-0.5, -1.5, -2.5]
    without = SimpleNamespace(token_ids=[9], logprobs=None)  # log-probs not asked for
    repeat_to(without, 3)
    assert without.token_ids == [9, 9, 9] and without.logprobs is None


def test_the_cap_holds_torchs_whole_allocator_where_vllm_allocates_too(monkeypatch):
    """--cap-gib: vLLM's share sized on the card, torch's fraction the whole cap (vLLM's KV cache and
    weights are torch allocations of the same process; the cap less vLLM's share stopped vLLM starting)."""
    import pytest

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.long_context import shares

    utilization, fraction = shares(80.0, 60.0, total_gib=140.0)  # an H200 held to an H100
    assert utilization == 60.0 / 140.0 and fraction == 80.0 / 140.0
    assert shares(80.0, 60.0, total_gib=79.2)[1] == 1.0  # a cap above the card holds nothing back
    assert shares(None, 30.0, total_gib=79.2) == (30.0 / 79.2, None)
    with pytest.raises(RuntimeError, match="out of memory under --cap-gib 80.0: vLLM's share alone takes 81.0 GiB"):
        shares(80.0, 81.0, total_gib=140.0)


def test_the_cap_runs_are_memory_only_and_take_their_length(tmp_path, monkeypatch):
    """long_context_gpu.sh cap / cap-trl / cap32: one run held to 80 GB at LENGTH tokens, vLLM decoding 64
    of them (8 x 49,152 tokens would not decode in a 10-minute call); checked against the benchmark's parser."""
    env, record = _recording_python(tmp_path)
    for mode, extra in (("cap", {}), ("cap-trl", {"LENGTH": "65536"}), ("qlora-ours", {"DECODED": "32"}),
                        ("lora-ours", {}), ("cap32", {}), ("cap", {"SET": "grpo.expandable_segments=true"}),
                        ("cap-trl", {"SET": "grpo.expandable_segments=true"})):
        done = subprocess.run(["bash", "benchmarks/long_context_gpu.sh", mode], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    parsed = [_parse(args, monkeypatch) for args in runs]
    assert [(a.trainer, a.finetune, a.length, a.cap_gib, a.decoded) for a in parsed] == [
        ("ours", "qlora", 49152, 80.0, 64), ("trl", "qlora", 65536, 80.0, 64), ("ours", "qlora", 20000, None, 32),
        ("ours", "lora", 20000, None, None),  # without DECODED every token is decoded
        ("ours", "lora", 6656, 80.0, 64),  # the 32B shape, LoRA 16-bit
        ("ours", "qlora", 49152, 80.0, 64), ("trl", "qlora", 49152, 80.0, 64)]
    assert parsed[4].model == "/tmp/qwen32b" and parsed[4].kv_cache_dtype == "fp8"
    assert [a.set for a in parsed] == [[]] * 5 + [["grpo.expandable_segments=true"], []]  # SET: grpoflow's runs only
    # and its model: a sparse checkpoint, which a 1-GPU machine's disk holds
    done = subprocess.run(["bash", "benchmarks/long_context_gpu.sh", "model32"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and json.loads(record.read_text().splitlines()[-1]) == [
        "benchmarks/long_context.py", "model", "--shape", "qwen3-32b", "--tokenizer", "/tmp/smollm2", "--out",
        "/tmp/qwen32b", "--sparse"]


def test_the_cap_bisects_take_their_range_and_settings(tmp_path, monkeypatch):
    """long_context_gpu.sh cap-bisect / cap-trl-bisect: QLoRA held to 80 GB from HIGH down to LOW, memory
    only; SET reaches grpoflow's tries, not TRL's."""
    env, record = _recording_python(tmp_path)
    env["SET"] = "grpo.expandable_segments=true"
    for mode, extra in (("cap-bisect", {}), ("cap-trl-bisect", {"LOW": "8192", "HIGH": "20000", "STEPS": "1"})):
        done = subprocess.run(["bash", "benchmarks/long_context_gpu.sh", mode], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    ours, trl = [_parse(json.loads(line), monkeypatch) for line in record.read_text().splitlines()]
    assert (ours.trainer, ours.finetune, ours.low, ours.high, ours.resolution, ours.cap_gib, ours.decoded,
            ours.offload, ours.set) == ("ours", "qlora", 4096, 49152, 2048, 80.0, 64, True,
                                        ["grpo.expandable_segments=true"])
    assert (trl.trainer, trl.low, trl.high, trl.steps, trl.offload, trl.set) == ("trl", 8192, 20000, 1, False, [])


def test_a_bisect_tries_the_top_first_and_hands_each_try_its_settings(tmp_path, monkeypatch, capsys):
    """Every try is a run of its own with the bisect's settings (its --set included); the lengths narrow
    to the resolution and each try's outcome is kept."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.long_context as bench

    commands, fits_up_to = [], {"length": 20000}

    def fake_run(command, check):  # a try that fits up to fits_up_to tokens, as its result file says
        commands.append(command)
        length = int(command[command.index("--length") + 1])
        tag = command[command.index("--tag") + 1]
        status = "ok" if length <= fits_up_to["length"] else "out_of_memory"
        (tmp_path / f"long_context-trl-{tag}.json").write_text(json.dumps({"status": status, "device_peak_gib": 1}))

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = SimpleNamespace(low=4096, high=49152, resolution=2048, out=tmp_path, trainer="trl", tag="cap",
                           model="/m", finetune="qlora", steps=1, kv_cache_dtype="auto", vllm_gib=None, cap_gib=80.0,
                           offload=False, max_tokens_per_forward=None, decoded=64, set=["a.b=1"])
    bench.bisect(args)
    tries = json.loads((tmp_path / "long_context-bisect-trl-cap.json").read_text())["tries"]
    assert [t["length"] for t in tries] == [49152, 26624, 15360, 20992, 18176, 19584]
    assert [t["status"] == "ok" for t in tries] == [False, False, True, False, True, True]
    assert all(c[-2:] == ["--set", "a.b=1"] and "--cap-gib" in c and "--decoded" in c for c in commands)
    assert capsys.readouterr().out.splitlines()[-1] == "trl qlora: fits 19584 tokens x 8; 20992 does not"
    # a range whose bottom is never tried says so, rather than that it fits
    fits_up_to["length"], args.low, args.high, args.tag = 16000, 14336, 18432, "narrow"
    bench.bisect(args)
    assert [t["length"] for t in json.loads((tmp_path / "long_context-bisect-trl-narrow.json").read_text())["tries"]
            ] == [18432, 16384]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "trl qlora: 16384 does not fit; 14336, the bottom of the range, was not tried")


def _recording_python(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose `python` writes its arguments, one JSON line a call, to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                    "open(os.environ['RECORD'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "python").chmod(0o755)
    record = tmp_path / "record.jsonl"
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
            "OUT": str(tmp_path / "o")}, record


def _parse(args: list[str], monkeypatch):
    """The arguments as long_context.py's own parser reads them (its run and sizing stood in for)."""
    assert args[0] == "benchmarks/long_context.py"
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.long_context as bench

    captured = []
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setattr(bench, "run", captured.append)
    monkeypatch.setattr(bench, "bisect", captured.append)
    monkeypatch.setattr(bench, "vllm_gib_for", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "log_grpoflow", lambda: None)
    bench.main()
    return captured[0]


def test_a_sparse_checkpoint_has_the_shapes_layout_and_takes_no_disk(tmp_path, monkeypatch):
    """model --sparse (the 32B shape's 61 GiB on a 64 GiB disk): the same tensors and bytes as a saved
    model of the shape, norms one and the rest zeros left as holes; transformers loads it and it runs."""
    monkeypatch.syspath_prepend(str(ROOT))
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from benchmarks.long_context import save_model, smoke_tokenizer

    tokenizer = smoke_tokenizer(tmp_path / "tokenizer")
    save_model("tiny", tokenizer, tmp_path / "saved")
    save_model("tiny", tokenizer, tmp_path / "sparse", sparse=True)
    saved, sparse = (tmp_path / "saved" / "model.safetensors"), (tmp_path / "sparse" / "model.safetensors")
    with safe_open(saved, "pt") as a, safe_open(sparse, "pt") as b:
        assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}
    assert sparse.stat().st_size == saved.stat().st_size
    assert sparse.stat().st_blocks * 512 < saved.stat().st_size / 10  # holes: a few blocks of header and norms
    assert json.loads((tmp_path / "sparse" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    weights = model.state_dict()
    assert all(torch.equal(t, torch.ones_like(t)) if "norm" in name else not t.any() for name, t in weights.items())
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
