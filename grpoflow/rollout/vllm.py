"""Rollouts through vLLM in the training process, on the training GPU (colocated).

    engine = VLLMEngine(model_path, tokenizer, dtype="bfloat16", gpu_memory_utilization=0.3, ...)
    groups = engine.generate(prompts, params)         # wakes vLLM if asleep
    engine.sleep()                                    # KV cache released while the trainer works
    engine.sync_weights(policy, step)                 # after an optimizer step, before the next generate

Weights after each optimizer step: full fine-tuning copies the policy's parameters into vLLM's
own tensors in place (`load_weights`, HF names; no state dict is gathered); LoRA hands vLLM the
adapters as a new LoRA request (saved to /dev/shm, 0.07 s for SmolLM2's), with no merge.
Sampling log-probs come back after temperature and the other processors ("processed_logprobs"),
what the trainer's importance-sampling correction compares against.

Tested with vLLM 0.26 (TESTED); another version is refused with a message rather than failing
somewhere inside vLLM's private attributes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from grpoflow.config import ConfigError
from grpoflow.rollout.base import Completion, Messages, SamplingParams

log = logging.getLogger("grpoflow.rollout")

TESTED = ("0.26.",)  # version prefixes run on the GPU machine
INSTALL = "pip install 'grpoflow[gpu]'  (vLLM 0.26.0, on a CUDA machine)"


class EngineError(RuntimeError):
    """vLLM could not start or serve; the message names the config key to change."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"rollout.engine: vllm, but vLLM is not installed ({e}); install it with {INSTALL}, "
                          "or set rollout.engine: hf") from None
    if not vllm.__version__.startswith(TESTED):
        raise ConfigError(f"rollout.engine: vllm {vllm.__version__} is installed; grpoflow is tested with vLLM "
                          f"{' / '.join(v + 'x' for v in TESTED)}. Install that ({INSTALL}) or set rollout.engine: hf")
    return vllm


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, dtype: str, gpu_memory_utilization: float,
                 max_model_len: int, seed: int, lora_rank: int | None = None, sleep: bool = True,
                 enforce_eager: bool = False):
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the model is reachable
        self.tokenizer = tokenizer
        self.sleep_enabled = sleep
        self.awake = {"weights", "kv_cache"}  # what vLLM holds on the GPU now
        self.lora_request = None
        self._lora_dir, self._lora_version = None, 0
        if lora_rank:  # adapters travel through memory-backed files, removed when the engine goes
            self._lora_dir = Path(tempfile.mkdtemp(prefix="grpoflow-lora-",
                                                   dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
            weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                      enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", max_logprobs=0)
        # cascade attention computed wrong results on some versions; GRPO's shared prompts would trigger it
        kwargs["disable_cascade_attn"] = True
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank_slot(lora_rank), max_loras=1)
        started = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises ValueError / RuntimeError / torch.OutOfMemoryError here
            text = str(e)
            if "memory" in text.lower() or "KV cache" in text:
                raise EngineError(
                    f"vLLM could not start in the memory it was given ({text.splitlines()[0][:300]}): lower "
                    f"rollout.max_model_len ({max_model_len}) or raise rollout.gpu_memory_utilization "
                    f"({gpu_memory_utilization}) if the card has room; lower it if training runs out of memory") from e
            raise
        log.info("rollout engine: vLLM %s in process, %s, gpu_memory_utilization %s, max_model_len %d, started in %.0fs",
                 vllm.__version__, dtype, gpu_memory_utilization, max_model_len, time.perf_counter() - started)

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams

        self.wake_up({"weights", "kv_cache"})
        prompt_ids, truncated = [], []
        keep = params.truncate_prompt_tokens
        for p in prompts:
            text = self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids  # as the transformers engine does
            truncated.append(keep is not None and len(ids) > keep)
            prompt_ids.append(ids[-keep:] if keep else ids)
        sampling = VLLMSamplingParams(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, seed=params.seed,
            logprobs=0 if params.logprobs else None)  # 0: the sampled token's log-prob only
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling,
                                    lora_request=self.lora_request, use_tqdm=False)
        groups = []
        for ids, cut, out in zip(prompt_ids, truncated, outputs):
            group = []
            for c in out.outputs:
                tokens = list(c.token_ids)
                logprobs = None
                if params.logprobs:
                    logprobs = [step[t].logprob for step, t in zip(c.logprobs, tokens)]
                group.append(Completion(prompt_ids=ids, token_ids=tokens,
                                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                                        logprobs=logprobs, finished=c.finish_reason == "stop",
                                        prompt_truncated=cut))
            groups.append(group)
        return groups

    # --- standby ----------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release the KV cache (level 1 also moves the weights to host memory) while the trainer works."""
        if self.sleep_enabled and self.awake:
            self.llm.sleep(level=1)
            self.awake = set()

    def wake_up(self, tags: set[str]) -> None:
        missing = tags - self.awake
        if missing:
            self.llm.wake_up(tags=sorted(missing))
            self.awake |= missing

    # --- weights ----------------------------------------------------------------------------

    def sync_weights(self, policy, step: int) -> None:
        """Make the next generation sample from the policy as it is now (`step`: for the interface)."""
        if self._lora_dir is not None:
            from vllm.lora.request import LoRARequest

            # vLLM caches adapters by id: every hand-over gets a new one (the warm-up's and step 0's too)
            self._lora_version += 1
            folder = self._lora_dir / f"v{self._lora_version:08d}"
            policy.model.save_pretrained(folder)  # adapters only
            self.lora_request = LoRARequest(f"policy-v{self._lora_version}", self._lora_version, str(folder))
            for old in sorted(self._lora_dir.iterdir())[:-2]:  # the current and the previous one stay
                shutil.rmtree(old, ignore_errors=True)
            return
        self.wake_up({"weights"})  # the KV cache stays released until generate
        model = self._vllm_model()
        # HF names in, vLLM's loader maps them (and stacks q/k/v, gate/up) into its own tensors
        model.load_weights(weights=((name, p.detach()) for name, p in policy.model.named_parameters()))

    def _vllm_model(self):
        try:  # vLLM 0.26, in process
            return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        except AttributeError:
            raise EngineError("cannot reach vLLM's model for in-place weight loading "
                              "(VLLM_ENABLE_V1_MULTIPROCESSING must be 0)") from None


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts max_lora_rank among a few sizes; the smallest that holds `rank`."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    raise ConfigError(f"model.lora.r: {rank} is above vLLM's largest LoRA rank (512)")
