"""`grpoflow chat`: ask a model a question, with the system prompt it was trained on, and watch it
answer, reasoning first.

A model is an HF folder, a run's final/ (LoRA adapters: transformers loads their base with them) or a
GGUF file (llama-cpp-python, as `grpoflow export` writes them). Decoding is greedy, as evaluation's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from grpoflow.errors import ConfigError
from grpoflow.rewards import extract_answer

Messages = list[dict[str, str]]


def messages(system_prompt: str, question: str) -> Messages:
    """The prompt as data prep writes it (grpoflow/prep_rows.py): the system prompt, then the question."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": question}]


@dataclass
class Answer:
    text: str

    @property
    def answer(self) -> str | None:
        return extract_answer(self.text)


class ChatModel:
    """`stream(messages, max_new_tokens)` yields the answer's text piece by piece."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        if path.is_file() and path.suffix == ".gguf":
            self.stream = _gguf(path)
        elif path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            self.stream = _transformers(path)
        else:
            raise ConfigError(f"--model {path}: not a model; give an HF model folder, a training run's final/ "
                              f"(LoRA adapters) or a .gguf file (grpoflow export writes them under gguf/)")

    def ask(self, msgs: Messages, *, max_new_tokens: int, write: Callable[[str], None]) -> Answer:
        parts = []
        for piece in self.stream(msgs, max_new_tokens):
            parts.append(piece)
            write(piece)
        return Answer("".join(parts))


def _transformers(path: Path) -> Callable[[Messages, int], Iterator[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # adapters: base + LoRA

    def stream(msgs: Messages, max_new_tokens: int) -> Iterator[str]:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        worker = threading.Thread(target=model.generate, kwargs=dict(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer, pad_token_id=pad))
        worker.start()
        yield from streamer
        worker.join()

    return stream


def _gguf(path: Path) -> Callable[[Messages, int], Iterator[str]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=0, verbose=False)  # 0: the context the model was trained with

    def stream(msgs: Messages, max_new_tokens: int) -> Iterator[str]:
        for chunk in llm.create_chat_completion(msgs, max_tokens=max_new_tokens, temperature=0.0, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    return stream
