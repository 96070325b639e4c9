"""Export: the trained model as files people run, checked before anything is published.

    merge     adapters + base -> 16-bit safetensors (merged/), adapters alone (adapters/)
    convert   merged/ -> GGUF f16 (llama.cpp's converter)
    quantize  f16 -> every method in export.quantizations (llama.cpp)
    verify    each GGUF against merged/: next-token logits, tokenization, chat template
    describe  Ollama Modelfile, model card, export_report.json / .md (sizes, sha256, fidelity)
    push      merged + adapters + the GGUFs that passed + card -> the Hub (when export.push_to_hub)

A GGUF that fails verification stays on disk, marked failed in the report, and is not pushed.
A failed push raises with every local file intact; running again resumes: steps whose output
exists are not redone (each output is written to a temporary name and renamed when complete).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grpoflow.answer_format import ANSWER_CLOSE, ANSWER_OPEN, REASONING_CLOSE, REASONING_OPEN
from grpoflow.atomic import write_atomic
from grpoflow.config import PipelineConfig
from grpoflow.export.gguf import GGUFExportError, convert_to_gguf, quantize_gguf, reference_logits, verify_gguf
from grpoflow.export.merge import merge_to_16bit
from grpoflow.hashing import cache_key, file_sha256, model_fingerprint
from grpoflow.hub import HubPushError, push_folder
from grpoflow.progress import Heartbeat

log = logging.getLogger("grpoflow.export")

EXPORT_VERSION = 1


@dataclass
class ExportReport:
    output_dir: str
    report: dict[str, Any]  # what export_report.json holds
    markdown: str

    def as_json(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "gguf": {f["method"]: f["status"] for f in self.report["gguf"]},
                "push": self.report["push"], "warnings": len(self.report["warnings"])}


def run_export(cfg: PipelineConfig, model_dir: Path, *, evaluation: dict[str, Any] | None = None,
               token: str | None = None) -> ExportReport:
    """`model_dir`: the training stage's final folder. `evaluation`: the evaluate stage's figures
    per model label, for the model card. `token`: the Hub token (else HF_TOKEN), used for the push only.

    Each file is logged as it is done, and a heartbeat says which step runs when one takes long
    (converting and quantizing take minutes on a CPU): there is no bar, on a terminal or not."""
    with Heartbeat(log, "export") as heartbeat:
        return _run_export(cfg, Path(model_dir), evaluation, token, heartbeat)


def _run_export(cfg: PipelineConfig, model_dir: Path, evaluation: dict[str, Any] | None, token: str | None,
                heartbeat: Heartbeat) -> ExportReport:
    ex = cfg.export
    model_dir = Path(model_dir)
    out = Path(ex.output_dir) / _export_key(cfg, model_dir)[:16]
    out.mkdir(parents=True, exist_ok=True)
    stem = (ex.hub_repo_id or "model").rsplit("/", 1)[-1]
    warnings: list[str] = []

    # merge
    merged_dir = out / "merged"
    if (merged_dir / "config.json").is_file():
        log.info("merged model exists: %s", merged_dir)
        adapters_dir = out / "adapters" if (out / "adapters").is_dir() else None
        from_adapters = adapters_dir is not None
    else:
        heartbeat.phase(f"merging {model_dir} ({ex.dtype})")
        merged = merge_to_16bit(model_dir, out, dtype=ex.dtype)
        adapters_dir, from_adapters = merged.adapters_dir, merged.from_adapters
        log.info("merged model: %s (%s)", merged_dir, _size(sum(f.stat().st_size for f in merged_dir.iterdir())))
    qlora = cfg.model.finetune == "qlora"
    if qlora:
        warnings.append("trained with QLoRA against a 4-bit base; the adapters are merged into the 16-bit base "
                        "(dequantized), which computes slightly differently from the 4-bit base they were trained on")

    # convert, quantize, verify
    gguf_dir = out / "gguf"
    f16 = gguf_dir / f"{stem}-f16.gguf"
    if not f16.is_file():
        heartbeat.phase(f"converting {merged_dir} to {f16.name}")
        convert_to_gguf(merged_dir, f16)
    heartbeat.phase("reference logits of the merged model")
    reference = reference_logits(merged_dir)
    files: list[dict[str, Any]] = []
    for method in dict.fromkeys(["f16", *ex.quantizations]):  # in order, without repeats
        entry: dict[str, Any] = {"method": method, "file": f"gguf/{stem}-{method}.gguf"}
        path = out / entry["file"]
        try:
            if method != "f16" and not path.is_file():
                heartbeat.phase(f"quantizing {path.name}")
                quantized = quantize_gguf(f16, path, method)
                entry.update(quantize_seconds=round(quantized.seconds, 1), fallbacks=quantized.fallbacks)
                if quantized.fallbacks:
                    warnings.append(f"{path.name}: tensors fell back from {method} to other types (k-quants need "
                                    f"rows divisible by 256): {'; '.join(quantized.fallbacks[:3])}")
            heartbeat.phase(f"verifying {path.name} against the merged model")
            check = verify_gguf(path, merged_dir, method=method, min_cosine=ex.min_cosine[method], reference=reference)
        except GGUFExportError as e:
            log.error("%s: %s", method, e)
            entry.update(status="failed", problems=[str(e)])
            warnings.append(f"{method}: {e}")
            files.append(entry)
            continue
        entry.update(status="passed" if check.passed else "failed", mean_cosine=round(check.mean_cosine, 6),
                     worst_cosine=round(check.worst_cosine, 6), max_abs_delta=round(check.max_abs_delta, 4),
                     top1_agreement=check.top1_agreement, tokens_match=check.tokens_match,
                     chat_template_match=check.chat_template_match, min_cosine=check.min_cosine,
                     problems=check.problems, verify_seconds=check.seconds)
        if not check.passed:
            log.error("%s failed verification, kept locally and not published: %s", path.name,
                      "; ".join(check.problems))
            warnings.append(f"{path.name} failed verification (kept, not published): {'; '.join(check.problems)}")
        else:
            log.info("%s: %s, verified (mean cosine %.5f against the merged model, top-1 %.0f%%)", entry["file"],
                     _size(path.stat().st_size), check.mean_cosine, 100 * check.top1_agreement)
        files.append(entry)

    passed = [f for f in files if f["status"] == "passed"]
    modelfile = _write_modelfile(out, passed, cfg)
    card = _model_card(cfg, model_dir, files, evaluation, from_adapters, qlora, stem)
    (out / "README.md").write_text(card)

    report = {
        "version": EXPORT_VERSION, "model_dir": str(model_dir), "base_model": str(cfg.model.name_or_path),
        "dtype": ex.dtype, "from_adapters": from_adapters, "qlora": qlora, "output_dir": str(out),
        "gguf": files, "modelfile": modelfile, "warnings": warnings,
        "artifacts": _inventory(out), "push": None,
    }
    _write_report(out, report)  # published with the files, and kept if the push fails
    log.info("export: %d of %d GGUF file(s) passed; Modelfile %s; report %s", len(passed), len(files),
             "-> " + modelfile if modelfile else "not written (no GGUF passed)", out / "export_report.md")
    if ex.push_to_hub:
        heartbeat.phase(f"pushing to {ex.hub_repo_id}")
        report["push"] = _push(out, ex, passed, adapters_dir, token)
        _write_report(out, report)
        log.info("pushed to %s", report["push"]["repo_url"])
    markdown = report_markdown(report)
    return ExportReport(str(out), report, markdown)


def _push(out: Path, ex, passed: list[dict], adapters_dir: Path | None, token: str | None) -> dict[str, Any]:
    """Stage what is published (hard links, not copies) and push it; the staging folder goes after."""
    stage = out / ".hub"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        for f in (out / "merged").iterdir():
            _link(f, stage / f.name)  # the merged model at the repo root, loadable by from_pretrained
        if adapters_dir is not None:
            for f in adapters_dir.iterdir():
                _link(f, stage / "adapters" / f.name)
        for entry in passed:
            _link(out / entry["file"], stage / entry["file"])
        for name in ("README.md", "Modelfile", "export_report.json"):
            if (out / name).is_file():
                _link(out / name, stage / name)
        try:
            result = push_folder(stage, ex.hub_repo_id, token=token, private=ex.hub_private, endpoint=ex.hub_endpoint,
                                 commit_message="grpoflow export: merged model, adapters, verified GGUFs")
        except HubPushError as e:
            (out / "push_error.txt").write_text(str(e) + "\n")  # HubPushError messages never hold the token
            raise type(e)(f"{e} Every exported file is kept in {out}; run the export again to retry the push.") \
                from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    (out / "push_error.txt").unlink(missing_ok=True)
    return {k: result[k] for k in ("repo_id", "repo_url", "commit_url", "commit_oid", "private")}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def _write_modelfile(out: Path, passed: list[dict], cfg: PipelineConfig) -> str | None:
    """An Ollama Modelfile for the smallest verified quantization (q4_k_m when it passed)."""
    preferred = ["q4_k_m", "q5_k_m", "q4_0", "q5_0", "q6_k", "q8_0", "f16", "q3_k_m", "q2_k"]
    ranked = sorted(passed, key=lambda f: preferred.index(f["method"]) if f["method"] in preferred else 99)
    if not ranked:
        (out / "Modelfile").unlink(missing_ok=True)
        return None
    lines = [f"FROM ./{ranked[0]['file']}", ""]
    # ChatML, as SmolLM2 and Qwen write it; Ollama reads other templates from the GGUF's metadata
    if "<|im_start|>" in ((out / "merged" / "chat_template.jinja").read_text()
                          if (out / "merged" / "chat_template.jinja").is_file() else _template_from_config(out)):
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system',
                  '{{ .System }}<|im_end|>',
                  '{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}',
                  '{{ .Content }}<|im_end|>',
                  '{{ end }}<|im_start|>assistant',
                  '"""', 'PARAMETER stop "<|im_end|>"', ""]
    system = cfg.data.system_prompt.replace('"""', "'''")
    lines += [f'SYSTEM """{system}"""', "PARAMETER temperature 0", ""]
    (out / "Modelfile").write_text("\n".join(lines))
    return ranked[0]["file"]


def _template_from_config(out: Path) -> str:
    config = out / "merged" / "tokenizer_config.json"
    return str(json.loads(config.read_text()).get("chat_template") or "") if config.is_file() else ""


def _model_card(cfg: PipelineConfig, model_dir: Path, files: list[dict], evaluation: dict | None,
                from_adapters: bool, qlora: bool, stem: str) -> str:
    front = {"base_model": str(cfg.model.name_or_path), "library_name": "transformers",
             "tags": ["grpo", "reasoning", "gguf", "grpoflow"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {stem}", "",
             f"{cfg.model.name_or_path} trained with GRPO ({cfg.grpo.loss_type} loss) by grpoflow on "
             f"{cfg.data.source}, then exported: merged {cfg.export.dtype} weights at the repo root"
             + (", the LoRA adapters alone in `adapters/`" if from_adapters else "")
             + ", and GGUF files checked against the merged model in `gguf/`.", ""]
    if qlora:
        lines += ["Trained with QLoRA against a 4-bit base; the adapters are merged into the 16-bit (dequantized) "
                  "base, which computes slightly differently from the 4-bit base they were trained on.", ""]
    lines += [f"It answers in the format `{REASONING_OPEN}...{REASONING_CLOSE}{ANSWER_OPEN}...{ANSWER_CLOSE}` when "
              "given the system prompt it was trained with:", "", "```", cfg.data.system_prompt.strip(), "```", ""]
    if evaluation:
        lines += ["## Evaluation (held-out set, greedy)", "", "| model | accuracy | last number | strict format |",
                  "|---|---|---|---|"]
        for label, f in evaluation.items():
            lines.append(f"| {label} | {100 * f['accuracy']:.1f}% | {100 * f['accuracy_last_number']:.1f}% | "
                         f"{100 * f['format_strict']:.1f}% |")
        lines.append("")
    lines += ["## GGUF files", "", "| file | status | mean cosine vs merged | top-1 agreement |", "|---|---|---|---|"]
    for f in files:
        cosine = f"{f['mean_cosine']:.4f}" if "mean_cosine" in f else "-"
        top1 = f"{100 * f['top1_agreement']:.0f}%" if "top1_agreement" in f else "-"
        lines.append(f"| `{f['file']}` | {f['status']} | {cosine} | {top1} |")
    lines += ["", "Only files marked passed are published here.", "", "## Training config", "", "```yaml",
              yaml.safe_dump(_public_config(cfg), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _public_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The config for the card: everything but local paths of this machine's output folders."""
    data = cfg.model_dump(mode="json")
    for section in ("data", "grpo", "eval", "export"):
        data[section].pop("output_dir", None)
    data["model"].pop("cache_dir", None)
    return data


def _inventory(out: Path) -> list[dict[str, Any]]:
    """Every exported file with its size and sha256."""
    rows = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(out).parts)):
        rel = path.relative_to(out).as_posix()
        if rel in ("export_report.json", "export_report.md"):
            continue
        rows.append({"file": rel, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return rows


def _write_report(out: Path, report: dict[str, Any]) -> None:
    write_atomic(out / "export_report.json", json.dumps(report, indent=2) + "\n")
    (out / "export_report.md").write_text(report_markdown(report) + "\n")


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"Export of `{report['model_dir']}` ({report['dtype']}) -> `{report['output_dir']}`", "",
             "| GGUF | status | mean cosine | worst cosine | max abs delta | top-1 | tokens | template |",
             "|---|---|---|---|---|---|---|---|"]
    for f in report["gguf"]:
        if "mean_cosine" in f:
            lines.append(f"| `{f['file']}` | {f['status']} | {f['mean_cosine']:.5f} | {f['worst_cosine']:.5f} | "
                         f"{f['max_abs_delta']:.3f} | {100 * f['top1_agreement']:.0f}% | "
                         f"{'same' if f['tokens_match'] else 'DIFFER'} | "
                         f"{'same' if f['chat_template_match'] else 'DIFFERS'} |")
        else:
            lines.append(f"| `{f['file']}` | {f['status']} | - | - | - | - | - | - |")
    lines += ["", "| file | size | sha256 |", "|---|---|---|"]
    lines += [f"| `{a['file']}` | {_size(a['bytes'])} | `{a['sha256'][:16]}` |" for a in report["artifacts"]]
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in report["warnings"]]
    if report["push"]:
        lines += ["", f"Pushed to {report['push']['repo_url']} ({report['push']['commit_url']})"]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _export_key(cfg: PipelineConfig, model_dir: Path) -> str:
    """The trained model's files and the settings that change the merged files; each GGUF is made
    once per name, and verification runs every time (seconds)."""
    return cache_key({"version": EXPORT_VERSION, "model": model_fingerprint(model_dir), "dtype": cfg.export.dtype,
                      "hub_repo_id": cfg.export.hub_repo_id})  # (file names come from the repo id)

