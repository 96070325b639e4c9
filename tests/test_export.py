"""The export stage end to end on a tiny model: merge -> GGUF (llama.cpp's converter) -> quantize
(llama.cpp) -> verify against the merged model -> model card, Modelfile, report -> push to a fake Hub.

Real llama.cpp (llama-cpp-python) and the real converter; the Hub is tests/hub_server.py (see its
docstring for what it does not cover: LFS/Xet transfers, which the real Hub uses for these files).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from grpoflow.config import validate_config
from grpoflow.export.gguf import GGUFExportError, convert_to_gguf, quantize_gguf
from grpoflow.hub import HubPushError, HubRefused
from stages.export import run_export
from tests.hub_server import FakeHub
from tests.test_export_merge import trained_adapters

TOKEN = "hf_EXPORTtokenForTests0123456789abcdefXYZ"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline; this talks to 127.0.0.1 only
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server = FakeHub(token=TOKEN).start()
    yield server
    server.stop()


def export_config(tmp_path: Path, tiny_model: Path, **export) -> object:
    settings = {"quantizations": ["q8_0", "q4_k_m"], "output_dir": str(tmp_path / "export")}
    settings.update(export)
    return validate_config({"model": {"name_or_path": str(tiny_model)}, "export": settings})


def everything_written(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_merges_converts_quantizes_verifies_and_pushes(tiny_model, tmp_path, hub, caplog):
    trained_adapters(tiny_model, tmp_path / "final")
    cfg = export_config(tmp_path, tiny_model, push_to_hub=True, hub_repo_id="alice/tiny-grpo", hub_endpoint=hub.url)
    evaluation = {"base": {"accuracy": 0.0, "accuracy_last_number": 0.01, "format_strict": 0.0},
                  "trained": {"accuracy": 0.02, "accuracy_last_number": 0.02, "format_strict": 0.98}}
    with caplog.at_level(logging.DEBUG):
        result = run_export(cfg, tmp_path / "final", evaluation=evaluation)
    out = Path(result.output_dir)
    report = json.loads((out / "export_report.json").read_text())
    by_method = {f["method"]: f for f in report["gguf"]}
    assert list(by_method) == ["f16", "q8_0", "q4_k_m"]
    f16, q8 = by_method["f16"], by_method["q8_0"]
    assert f16["status"] == "passed" and f16["mean_cosine"] >= 0.999
    assert q8["status"] == "passed" and q8["mean_cosine"] >= 0.99
    assert all(f["tokens_match"] and f["chat_template_match"] for f in by_method.values())
    # hidden size 32 is not a multiple of 256: llama.cpp falls back per tensor and says so
    assert by_method["q4_k_m"]["fallbacks"] and any("q4_k_m" in w and "fell back" in w for w in report["warnings"])

    files = {a["file"]: a for a in report["artifacts"]}
    assert {"merged/model.safetensors", "adapters/adapter_model.safetensors", "gguf/tiny-grpo-f16.gguf",
            "gguf/tiny-grpo-q8_0.gguf", "gguf/tiny-grpo-q4_k_m.gguf", "README.md", "Modelfile"} <= set(files)
    assert all(len(a["sha256"]) == 64 and a["bytes"] > 0 for a in files.values())
    assert (out / "Modelfile").read_text().startswith("FROM ./gguf/tiny-grpo-q4_k_m.gguf")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "| trained | 2.0% | 2.0% | 98.0% |" in card
    assert "| `gguf/tiny-grpo-q8_0.gguf` | passed |" in card and "```yaml" in card
    assert "| `gguf/tiny-grpo-f16.gguf` | passed |" in result.markdown

    pushed = hub.repos["alice/tiny-grpo"].files
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapters/adapter_model.safetensors",
            "gguf/tiny-grpo-q8_0.gguf", "README.md", "Modelfile", "export_report.json"} <= set(pushed)
    assert report["push"]["repo_id"] == "alice/tiny-grpo"
    assert not (out / ".hub").exists()  # the staging links are gone

    # the token reaches no file, log record or returned value
    assert all(TOKEN.encode() not in data for data in everything_written(out).values())
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(result.report) and TOKEN not in result.markdown


def test_a_gguf_that_fails_verification_is_kept_and_not_pushed(tiny_model, tmp_path, hub):
    trained_adapters(tiny_model, tmp_path / "final")
    cfg = export_config(tmp_path, tiny_model, quantizations=["q4_k_m"], min_cosine={"q4_k_m": 1.01},
                        push_to_hub=True, hub_repo_id="alice/tiny-grpo", hub_endpoint=hub.url)
    result = run_export(cfg, tmp_path / "final")
    q4 = next(f for f in result.report["gguf"] if f["method"] == "q4_k_m")
    assert q4["status"] == "failed" and "below 1.01" in q4["problems"][0]
    assert (Path(result.output_dir) / q4["file"]).is_file()  # kept locally
    assert "gguf/tiny-grpo-q4_k_m.gguf" not in hub.repos["alice/tiny-grpo"].files
    assert "gguf/tiny-grpo-f16.gguf" in hub.repos["alice/tiny-grpo"].files
    assert "Modelfile" in hub.repos["alice/tiny-grpo"].files  # it points at f16, the best that passed
    assert any("failed verification" in w for w in result.report["warnings"])


def test_a_hub_error_mid_push_keeps_every_local_file(tiny_model, tmp_path, hub):
    trained_adapters(tiny_model, tmp_path / "final")
    cfg = export_config(tmp_path, tiny_model, quantizations=["q8_0"], push_to_hub=True,
                        hub_repo_id="alice/tiny-grpo", hub_endpoint=hub.url)
    hub.fail("commit", 403, times=None)  # the repo is created, then the upload is refused
    with pytest.raises(HubPushError) as failed:
        run_export(cfg, tmp_path / "final")
    assert "Every exported file is kept" in str(failed.value) and TOKEN not in str(failed.value)
    assert isinstance(failed.value, HubRefused)  # a 403 is the user's to fix: `grpoflow run` exits 2, one line
    out = next((tmp_path / "export").iterdir())
    before = everything_written(out)
    assert {"merged/model.safetensors", "gguf/tiny-grpo-f16.gguf", "gguf/tiny-grpo-q8_0.gguf",
            "README.md", "push_error.txt"} <= set(before)
    assert all(TOKEN.encode() not in data for data in before.values())

    hub.fail("commit", None, times=0)  # the Hub is back: the same call resumes and pushes
    result = run_export(cfg, tmp_path / "final")
    assert result.report["push"]["repo_id"] == "alice/tiny-grpo"
    assert not (out / "push_error.txt").exists()
    after = everything_written(out)
    for name in ("merged/model.safetensors", "gguf/tiny-grpo-f16.gguf", "gguf/tiny-grpo-q8_0.gguf"):
        assert after[name] == before[name]  # made once, not redone


def test_conversion_needs_the_tokenizer_and_says_so(tiny_model, tmp_path):
    from grpoflow.export.merge import merge_to_16bit

    merged = merge_to_16bit(tiny_model, tmp_path / "export").merged_dir
    (merged / "tokenizer.json").unlink()
    with pytest.raises(GGUFExportError, match=r"no tokenizer file .*tokenizer\.json.*tokenizer.save_pretrained"):
        convert_to_gguf(merged, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_unknown_pre_tokenizer_names_the_tokenizer(tiny_model, tmp_path):
    from grpoflow.export.merge import merge_to_16bit

    merged = merge_to_16bit(tiny_model, tmp_path / "export").merged_dir
    tokenizer = json.loads((merged / "tokenizer.json").read_text())
    # a pre-tokenizer llama.cpp has never hashed: split on every digit and space, nothing else
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "[0-9 ]"}, "behavior": "Isolated",
                                  "invert": False}
    (merged / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GGUFExportError, match=r"does not know this model's tokenizer \(.*tokenizer\.json\)"
                                              r".*\(this one: [0-9a-f]{64}\)"):
        convert_to_gguf(merged, tmp_path / "out.gguf")


def test_a_quantization_that_fails_raises_with_the_file(tmp_path):
    broken = tmp_path / "broken-f16.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))  # a header and nothing else
    with pytest.raises(GGUFExportError, match=r"quantizing broken-f16.gguf to q8_0 failed"):
        quantize_gguf(broken, tmp_path / "out.gguf", "q8_0")
    assert not list(tmp_path.glob("*out.gguf"))  # no partial file left behind
