"""Rollouts through vLLM in the training process, on the training GPU (colocated).

    engine = VLLMEngine(model_path, tokenizer, dtype="bfloat16", gpu_memory_utilization=0.3, ...)
    groups = engine.generate(prompts, params)         # wakes vLLM if asleep
    engine.sleep()                                    # KV cache released while the trainer works
    engine.sync_weights(policy, step)                 # after an optimizer step, before the next generate

Weights after each optimizer step: full fine-tuning copies the policy's parameters into vLLM's
own tensors in place (`load_weights`, HF names; no state dict is gathered); LoRA hands vLLM the
adapters as a new LoRA request (saved to /dev/shm, 0.07 s for SmolLM2's), with no merge. A policy
sharded with FSDP2 (grpo.distributed: fsdp) holds 1/N of each tensor: each one is gathered whole
(`full_tensor`, a collective) on every process, for that process's vLLM.
Sampling log-probs come back after temperature and the other processors ("processed_logprobs"),
what the trainer's importance-sampling correction compares against.

Standby, by what the weights are:
    full fine-tuning  sleep(level=2): KV cache and weights released (the next sync rewrites every
                      weight anyway, so they are not copied to host memory and back)
    LoRA, shared      the policy's frozen base weights *are* vLLM's tensors (`share_weights`): one
                      copy on the card; only the KV cache is released
    LoRA, not shared  sleep(level=1): KV cache released, weights parked in host memory

Tested with vLLM 0.26 (grpoflow.private_api.VLLM_CHECKED); another version is refused with a message
rather than failing somewhere inside vLLM's private attributes. Whatever reaches below vLLM's public
`LLM` (its worker, its model's loader, its sleep-mode allocator) goes through grpoflow/private_api.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from grpoflow.config import ConfigError
from grpoflow.errors import EngineError
from grpoflow.private_api import (VLLM_CHECKED, load_vllm_weights, pin_vllm_main_stream, release_vllm_kv_cache,
                                  vllm_4bit_shards, vllm_model, vllm_packed_modules, vllm_released_bytes,
                                  wake_vllm_kv_cache)
from grpoflow.rollout.base import Completion, Messages, SamplingParams

log = logging.getLogger("grpoflow.rollout")

INSTALL = "pip install 'grpoflow[gpu]'  (vLLM 0.26.0, on a CUDA machine)"


def _quiet_stdout() -> None:
    """vLLM logs to stdout by default; grpoflow's stdout carries the commands' JSON results."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def vllm_available() -> bool:
    _quiet_stdout()
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


def import_vllm():
    _quiet_stdout()
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"rollout.engine: vllm, but vLLM is not installed ({e}); install it with {INSTALL}, "
                          "or set rollout.engine: hf") from None
    if not vllm.__version__.startswith(VLLM_CHECKED):
        raise ConfigError(f"rollout.engine: vllm {vllm.__version__} is installed; grpoflow is tested with vLLM "
                          f"{' / '.join(v + 'x' for v in VLLM_CHECKED)}. Install that ({INSTALL}) or set rollout.engine: hf")
    return vllm


# vLLM checks that the card's free memory did not grow while it profiled itself at start-up; another
# process freeing memory meanwhile (a colocated run releasing its KV cache at standby, every step)
# trips that check. It is a race with the other process, not a lack of memory: start again.
PROFILING_RACE = "Error in memory profiling"
START_TRIES = 3


def _start_llm(vllm, kwargs: dict):
    """vllm.LLM(**kwargs), tried again (after 5-10 s, then 10-15 s) when another process on the card
    changed its memory while vLLM measured it; any other failure, or the race START_TRIES times, is an
    EngineError that says which."""
    race = None
    for attempt in range(1, START_TRIES + 1):
        try:
            with _root_logger_kept():
                return vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises ValueError / RuntimeError / AssertionError / torch.OutOfMemoryError
            text = str(e)
            if PROFILING_RACE not in text:
                if race is not None:  # a later try failed otherwise: the race is what the user needs to hear
                    break
                if "memory" in text.lower() or "KV cache" in text:
                    raise EngineError(
                        f"vLLM could not start in the memory it was given ({text.splitlines()[0][:300]}): lower "
                        f"rollout.max_model_len ({kwargs['max_model_len']}) or raise rollout.gpu_memory_utilization "
                        f"({kwargs['gpu_memory_utilization']}) if the card has room; lower it if training runs out "
                        "of memory. rollout.kv_cache_dtype: fp8 halves the KV cache; rollout.quantization: "
                        "bitsandbytes quarters vLLM's weights (LoRA)") from e
                raise
            race = e
            if attempt < START_TRIES:
                wait = 5 * attempt + random.uniform(0, 5)  # apart from a twin run started at the same time
                log.warning("vLLM's start-up memory check saw another process on this GPU free memory while it "
                            "measured (try %d of %d); starting again in %.0f s", attempt, START_TRIES, wait)
                gc.collect()  # the failed engine's weights go before the next one loads its own
                _empty_cuda_cache()
                time.sleep(wait)
    raise EngineError(
        f"vLLM could not start: {START_TRIES} times, another process on this GPU changed its memory use while "
        f"vLLM measured the card ({str(race).splitlines()[0][:200]}). Start this run when the others on the card "
        "are not stepping (each colocated run frees and takes back its KV cache every step), or give it a GPU "
        "of its own (CUDA_VISIBLE_DEVICES)") from race


@contextlib.contextmanager
def _root_logger_kept():
    """Something in vLLM's start-up stack gives the root logger a handler of its own (seen with vLLM 0.26
    on an H100 and an H200: every grpoflow record after the start printed twice, once as
    "INFO:grpoflow.train:..."). The root logger is the application's: handlers added during the start are
    taken off again, and its level put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


AUTO_EVAL_SEQUENCES = 64  # gpu_memory_utilization auto without a generation size (evaluation): completions at once
AUTO_MOST = 0.95  # an automatic share above this leaves the trainer nothing


def _auto_share(model_path: str, *, dtype: str, max_model_len: int, sequences: int, quantization: str | None,
                kv_cache_dtype: str) -> float:
    """rollout.gpu_memory_utilization auto: vLLM's need (grpoflow/rollout/sizing.py) over the card."""
    import torch
    from transformers import AutoConfig

    from grpoflow.rollout.sizing import GIB, vllm_need

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    need = vllm_need(config, sequences=sequences, max_model_len=max_model_len, dtype=dtype,
                     quantized=quantization == "bitsandbytes", kv_cache_dtype=kv_cache_dtype)
    total = torch.cuda.mem_get_info()[1]
    share = need.total / total
    if share > AUTO_MOST:
        raise ConfigError(
            f"rollout.gpu_memory_utilization auto: vLLM needs {need.describe()} for {sequences} completions of "
            f"up to {max_model_len} tokens at once, {share:.0%} of this card's {total / GIB:.1f} GiB. Set "
            "rollout.kv_cache_dtype: fp8 (half the KV cache), a shorter grpo.max_completion_length or fewer "
            "completions a generation, or a number for rollout.gpu_memory_utilization (vLLM then runs fewer "
            "completions at once)")
    log.info("rollout.gpu_memory_utilization auto: %.3f of the card (%s for %d completions of up to %d tokens)",
             share, need.describe(), sequences, max_model_len)
    return round(share, 4)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, dtype: str, gpu_memory_utilization: float | str,
                 max_model_len: int, seed: int, lora_rank: int | None = None, sleep: bool = True,
                 enforce_eager: bool = False, seed_per_prompt: bool = False,
                 completions_per_call: int | None = None, largest_call: int | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto"):
        """completions_per_call: the completions one generate call asks for (this process's prompts
        x n); vLLM is sized to run them all at once, on CUDA graphs. largest_call: the most any call
        asks for (evaluation during training may ask for more); default completions_per_call.
        quantization: "bitsandbytes" loads the weights in 4 bits (rollout.quantization);
        kv_cache_dtype: "fp8" halves the KV cache.
        gpu_memory_utilization "auto": sized to the weights and every completion's KV cache at once."""
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the model is reachable
        self.tokenizer = tokenizer
        self.sleep_enabled = sleep
        self.awake = {"weights", "kv_cache"}  # what vLLM holds on the GPU now
        self.wakes = 0  # how many times released memory was mapped again (StepMeter reads it)
        self.full_weights = lora_rank is None  # every weight comes from the policy at each sync
        self.weights_current = True  # False after a level-2 sleep, until the next sync_weights
        self.shared_bytes = 0  # policy weights that are vLLM's own tensors (share_weights)
        self.stream = None  # the CUDA stream generate runs vLLM on (use_stream); None: the caller's
        self.lora_request = None
        self.timings: dict[str, float] = {}  # the last generate's phases, seconds
        self._lora_dir, self._lora_version = None, 0
        if lora_rank:  # adapters travel through memory-backed files, removed when the engine goes
            self._lora_dir = Path(tempfile.mkdtemp(prefix="grpoflow-lora-",
                                                   dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
            weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
        if gpu_memory_utilization == "auto":
            gpu_memory_utilization = _auto_share(model_path, dtype=dtype, max_model_len=max_model_len,
                                                 sequences=completions_per_call or AUTO_EVAL_SEQUENCES,
                                                 quantization=quantization, kv_cache_dtype=kv_cache_dtype)
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                      enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", max_logprobs=0)
        # cascade attention computed wrong results on some versions; GRPO's shared prompts would trigger it
        kwargs["disable_cascade_attn"] = True
        kwargs.update(_batch_limits(completions_per_call, enforce_eager, largest_call))
        if quantization:  # quantized as it loads, from the same bf16 checkpoint the trainer quantizes
            kwargs["quantization"] = quantization
        if kv_cache_dtype != "auto":
            kwargs["kv_cache_dtype"] = kv_cache_dtype
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # under torchrun: one engine per process on its own GPU, inside the launcher's process
            # group (as TRL's colocate mode does), each drawing its own noise
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["seed"] = seed + int(os.environ["RANK"])
        # per-request seeds make vLLM's sampler draw each seeded request on its own (one small
        # kernel per request at every decoding step): only when asked for (rollout.seed_per_prompt)
        self.per_request_seeds = seed_per_prompt
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank_slot(lora_rank), max_loras=1)
        started = time.perf_counter()
        import torch

        cuda = torch.cuda.is_available()
        free_before = torch.cuda.mem_get_info()[0] if cuda else 0
        self.llm = _start_llm(vllm, kwargs)
        # what vLLM took on the card: its weights, KV cache and CUDA graphs (memory/vllm_gib)
        self.device_bytes = max(0, free_before - torch.cuda.mem_get_info()[0]) if cuda else 0
        log.info("rollout engine: vLLM %s in process, %s, gpu_memory_utilization %s, max_model_len %d, started in %.0fs",
                 vllm.__version__, dtype, gpu_memory_utilization, max_model_len, time.perf_counter() - started)

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[Messages], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """seeds: one per prompt, a per-request seed with seed_per_prompt (vLLM draws a seeded request
        from its own generator, whatever else is in the batch); otherwise vLLM's engine seed."""
        return self.generate_ids([self.tokenizer(self.tokenizer.apply_chat_template(
            p, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids for p in prompts],
            params, seeds)  # tokenized as the transformers engine does

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[Completion]]:
        """generate for prompts already tokenized (the next turn of a multi-turn episode)."""
        from vllm import SamplingParams as VLLMSamplingParams

        if not self.weights_current:
            raise EngineError("vLLM released its weights at sleep (full fine-tuning): call sync_weights "
                              "before generate")
        started = time.perf_counter()
        self.wake_up({"weights", "kv_cache"})
        woken = time.perf_counter()
        keep = params.truncate_prompt_tokens
        truncated = [keep is not None and len(ids) > keep for ids in prompt_ids]
        prompt_ids = [ids[-keep:] if keep else ids for ids in prompt_ids]
        seeds = seeds if seeds and self.per_request_seeds else [params.seed] * len(prompt_ids)
        sampling = [VLLMSamplingParams(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, seed=seeds[i], ignore_eos=params.ignore_eos,
            logprobs=0 if params.logprobs else None,  # 0: the sampled token's log-prob only
            # a few flat lists a completion, not a dict and a Logprob object a token: less work for
            # vLLM's output loop and the garbage collector at every decoding step
            flat_logprobs=True,
            detokenize=False)  # the tokens are decoded once below; vLLM's per-step decoding costs CPU time
            for i in range(len(prompt_ids))]
        prepared = time.perf_counter()
        with self._on_stream():
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling,
                                        lora_request=self.lora_request, use_tqdm=False)
        sampled = time.perf_counter()
        groups = []
        for ids, cut, out in zip(prompt_ids, truncated, outputs):
            group = []
            for c in out.outputs:
                tokens = list(c.token_ids)
                group.append(Completion(prompt_ids=ids, token_ids=tokens,
                                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                                        logprobs=_sampled_logprobs(c.logprobs, tokens) if params.logprobs else None,
                                        finished=c.finish_reason == "stop", prompt_truncated=cut))
            groups.append(group)
        done = time.perf_counter()
        self.timings = {"wake_up": woken - started, "prepare": prepared - woken, "sample": sampled - prepared,
                        "decode": done - sampled}
        return groups

    # --- standby ---------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release the KV cache (and the weights where they need not stay) while the trainer works."""
        if not (self.sleep_enabled and self.awake):
            return
        if self.shared_bytes:  # the policy trains on these weights: only the KV cache goes
            self._release_kv_cache()
            return
        self.llm.sleep(level=2 if self.full_weights else 1)
        self.awake = set()
        self.weights_current = not self.full_weights

    def wake_up(self, tags: set[str]) -> None:
        missing = tags - self.awake
        if not missing:
            return
        import torch

        # the trainer's freed blocks go back to the card before vLLM maps its memory again,
        # or both are counted at once: the step's peak
        torch.cuda.empty_cache()
        if self.shared_bytes:  # only the KV cache was released, behind vLLM's sleep
            wake_vllm_kv_cache(self.llm)
        else:
            self.llm.wake_up(tags=sorted(missing))
        self.awake |= missing
        self.wakes += 1

    def released_bytes(self) -> int:
        """What vLLM has given back to the card while asleep (0 awake): torch's statistics still count it."""
        if not self.sleep_enabled or self.awake == {"weights", "kv_cache"}:
            return 0
        return vllm_released_bytes()

    def _release_kv_cache(self) -> None:
        """sleep() for the KV cache alone (vLLM's own sleep unmaps every allocation, weights too)."""
        if "kv_cache" not in self.awake:
            return
        self.llm.reset_prefix_cache()  # cached prompt blocks are about to hold garbage
        release_vllm_kv_cache()
        self.awake.discard("kv_cache")

    # --- weights ----------------------------------------------------------------------------

    def sync_weights(self, policy, step: int) -> None:
        """Make the next generation sample from the policy as it is now (`step`: for the interface)."""
        if self._lora_dir is not None:
            # adapters only; under FSDP2 gathered whole onto every process (None: the model's own)
            self.use_adapters(lambda folder: policy.model.save_pretrained(
                folder, state_dict=policy.whole_trained_weights(every_process=True)))
            return
        # one tensor at a time, gathered from FSDP2's shards if the policy is sharded
        self.load_weights(policy.whole_parameters())

    def load_weights(self, named) -> None:
        """Full fine-tuning: (HF name, tensor) pairs into vLLM's own tensors; vLLM's loader maps the
        names and stacks q/k/v, gate/up. The rollout server passes the tensors it receives."""
        self.wake_up({"weights"})  # the KV cache stays released until generate
        load_vllm_weights(self.llm, named)
        self.weights_current = True
        # a KV cache that stays allocated (rollout.sleep false, async mode, the rollout server) holds the
        # prompts' blocks computed by the old weights: prefix caching would reuse them for the new ones
        if "kv_cache" in self.awake and self.llm.reset_prefix_cache() is False:
            raise EngineError("vLLM could not drop its prefix cache after a weight update (a request still "
                              "running?): the next generation would reuse keys and values of the old weights")

    def use_adapters(self, write) -> None:
        """LoRA: sample with the adapters `write(folder)` saves in a new folder (PEFT's files)."""
        from vllm.lora.request import LoRARequest

        # vLLM caches adapters by id: every hand-over gets a new one (the warm-up's and step 0's too)
        self._lora_version += 1
        folder = self._lora_dir / f"v{self._lora_version:08d}"
        write(folder)
        self.lora_request = LoRARequest(f"policy-v{self._lora_version}", self._lora_version, str(folder))
        for old in sorted(self._lora_dir.iterdir())[:-2]:  # the current and the previous one stay
            shutil.rmtree(old, ignore_errors=True)

    def use_stream(self, stream) -> None:
        """Run vLLM's kernels on `stream` from now on, whichever thread generates (async rollouts: the
        generation's own stream, beside the trainer's). vLLM 0.26's model runner otherwise keeps the
        stream of the thread that first generated (the trainer's) as its own: from a second thread,
        decoding went back onto the trainer's stream after one step and queued behind the whole
        training pass, and that first step's sampled tokens were copied without waiting for the stream
        that sampled them (private_api.pin_vllm_main_stream)."""
        pin_vllm_main_stream(self.llm, stream)
        self.stream = stream

    @contextlib.contextmanager
    def _on_stream(self):
        """A generate call's kernels on self.stream, after what the caller's stream queued (the weights
        or adapters just handed over); the caller's current stream is its own again afterwards."""
        if self.stream is None:
            yield
            return
        import torch

        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield

    def share_weights(self, policy) -> int:
        """LoRA: make the policy's frozen base weights views of vLLM's tensors, so the card holds
        one copy. 16-bit weights are shared where they are equal, bit for bit (vLLM stacks q/k/v and
        gate/up: their rows are slices of its fused tensors). QLoRA's 4-bit weights: vLLM packs each
        checkpoint weight to nf4 on its own and stacks the packed bytes in the same order, so a
        4-bit weight is rows of vLLM's; the policy takes vLLM's bytes and quantization state both
        (`_adopted_4bit_state`), and trainer and sampler compute with one 4-bit model. Returns the
        bytes freed; what stays the policy's own is logged with the reason."""
        import torch

        model = vllm_model(self.llm)
        vllm_params = {name.replace(".base_layer", ""): p for name, p in model.named_parameters()}
        rows = {_hf_name(name): p.shape[0] for name, p in policy.model.named_parameters()}
        packed = vllm_packed_modules(self.llm)  # {"qkv_proj": ["q_proj", ...]}
        slices = {}  # HF name -> the slice of a vLLM tensor it is
        for name, vp in vllm_params.items():
            module, _, leaf = name.rpartition(".")
            prefix, _, last = module.rpartition(".")
            parts = packed.get(last, [last])
            offset = 0
            for part in parts:
                hf_name = f"{prefix}.{part}.{leaf}" if prefix else f"{part}.{leaf}"
                slices[hf_name] = (vp, offset)
                offset += rows.get(hf_name, 0)
        saved, kept = 0, {}  # kept: reason -> [tensors, bytes] of what stays the policy's own
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                four_bit = type(p).__name__ == "Params4bit"
                if p.requires_grad or not (p.is_floating_point() or four_bit):
                    continue
                size = p.numel() * p.element_size()
                key = _hf_name(name)
                vp, offset = slices.get(key, (None, 0))
                why = _unlike(vp, offset, p)
                if why is None:
                    view = vp.data[offset:offset + p.shape[0]]
                    if view.data_ptr() == p.data_ptr():
                        continue
                    if four_bit:
                        state, why = _adopted_4bit_state(vp, offset, view, p)
                    else:  # the policy may still be in host memory (shares_base_weights): a tensor at a time
                        why = None if torch.equal(view, p.to(view.device)) else "values differ from vLLM's"
                if why is not None:
                    count = kept.setdefault(why, [0, 0, key])
                    count[0], count[1] = count[0] + 1, count[1] + size
                    continue
                if four_bit:
                    p.quant_state = state
                saved += size
                p.data = view  # tied weights are one Parameter: both follow
        torch.cuda.empty_cache()
        self.shared_bytes = saved
        log.info("vLLM and the policy share %.2f GiB of base weights", saved / 2**30)
        # most of the base held twice is memory a user counted on (it hid the QLoRA bug of 2026-12-06): a warning
        own = sum(size for _, size, _ in kept.values())
        level = logging.WARNING if own > saved else logging.INFO
        for why, (count, size, first) in kept.items():
            log.log(level, "rollout.share_weights: %d frozen tensors (%.2f GiB) stay the policy's own: %s (first: %s)",
                    count, size / 2**30, why, first)
        return saved


def _unlike(vllm_param, offset: int, p) -> str | None:
    """Why the policy's frozen tensor `p` cannot be rows `offset`.. of vLLM's tensor (None if it can),
    with what each side holds: the reason a user reads in the log when memory is not saved."""
    if vllm_param is None:
        return "no tensor of vLLM's model holds it"
    # the storage's dtype: vLLM's 4-bit weights (BitsAndBytesWeightParameter) answer `dtype` with the
    # model's dtype, though they hold uint8 bytes
    mine, theirs = (p.data.dtype, tuple(p.shape[1:])), (vllm_param.data.dtype, tuple(vllm_param.shape[1:]))
    if mine != theirs:
        return (f"vLLM holds it as {theirs[0]} rows of {list(theirs[1])}, "
                f"the policy as {mine[0]} rows of {list(mine[1])}")
    if offset + p.shape[0] > vllm_param.shape[0]:
        return f"its rows would end past vLLM's tensor ({offset} + {p.shape[0]} > {vllm_param.shape[0]})"
    return None


# A 4-bit weight counts as the one vLLM holds when their dequantized values differ by at most this much
# of the weight's mean magnitude. vLLM quantizes the checkpoint's tensors as stored (float32 in some
# checkpoints), the trainer after casting them to its dtype: near a boundary a code can differ (0.8% of
# the bytes, 0.4% of the magnitude, for a float32 checkpoint); another weight is ~140% away.
SAME_4BIT_WEIGHT = 0.05


def _adopted_4bit_state(vllm_param, offset: int, view, p):
    """(state, None): the quantization state for the policy's 4-bit weight `p` to compute with vLLM's
    packed bytes `view` (at `offset` of vLLM's tensor `vllm_param`), vLLM's own state of that shard in
    p's output dtype. (None, why) unless the shard is p's weight: same shape, block size and type, and
    dequantized values within SAME_4BIT_WEIGHT of p's."""
    import copy

    mine, theirs = getattr(p, "quant_state", None), vllm_4bit_shards(vllm_param).get(offset)
    if mine is None or theirs is None:
        return None, "no 4-bit shard of vLLM's starts there" if mine is not None else "no quantization state"
    for what, a, b in (("shape", tuple(theirs.shape), tuple(mine.shape)), ("block size", theirs.blocksize,
                       mine.blocksize), ("type", theirs.quant_type, mine.quant_type)):
        if a != b:
            return None, f"vLLM quantized it with another {what} ({a}, the policy {b})"
    adopted = copy.copy(theirs)  # vLLM's scales, not a copy of them
    adopted.dtype = mine.dtype
    ours = _dequantize_4bit(p.data.to(view.device), mine).float()
    gap = float((_dequantize_4bit(view, adopted).float() - ours).abs().mean() / ours.abs().mean().clamp_min(1e-30))
    if gap > SAME_4BIT_WEIGHT:
        return None, f"vLLM's shard there is another weight (values {100 * SAME_4BIT_WEIGHT:.0f}% or more apart)"
    return adopted, None


def _dequantize_4bit(packed, state):
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(packed, quant_state=state)


def _sampled_logprobs(logprobs, tokens: list[int]) -> list[float]:
    """The sampled tokens' log-probs, asked for with logprobs=0: one entry a position. vLLM's flat
    layout (FlatLogprobs) holds them as a list already; the nested one as {token: Logprob} a step."""
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(tokens) and list(logprobs.token_ids) == tokens:
        return list(flat)
    return [step[t].logprob for step, t in zip(logprobs, tokens)]


def _batch_limits(batch: int | None, enforce_eager: bool, largest: int | None = None) -> dict:
    """vLLM's limits for generate calls of `batch` completions, `largest` the biggest call.

    vLLM runs at most max_num_seqs sequences at once (256 by default on cards under 70 GB): raised
    to hold the largest call, or it would decode in waves. It captures a CUDA graph for each decoding
    batch size up to 512 by default, 51 sizes twice over (full and piecewise): 52 s of start-up and
    1.53 GiB on the 8B shape (H100, 2026-12-06), for training calls of 8 completions that replay one
    graph. Captured up to the largest call instead, in vLLM's steps (1, 2, 4, then 8s, then 16s from
    256), capped at 2048: a bigger call decodes without graphs until it shrinks to that."""
    if not batch:
        return {}
    largest = max(batch, largest or 0)
    limits = {"max_num_seqs": largest} if largest > 256 else {}
    if not enforce_eager:
        limits["compilation_config"] = {"max_cudagraph_capture_size": _graph_size(largest)}
    return limits


def _graph_size(n: int) -> int:
    """The smallest of vLLM's CUDA graph sizes that holds a decoding batch of n, 2048 at most."""
    if n <= 4:
        return 1 << (n - 1).bit_length()
    if n < 256:
        return -(-n // 8) * 8
    return min(-(-n // 16) * 16, 2048)


def _hf_name(peft_name: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight -> model.layers.0.self_attn.q_proj.weight"""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts max_lora_rank among a few sizes; the smallest that holds `rank`."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    raise ConfigError(f"model.lora.r: {rank} is above vLLM's largest LoRA rank (512)")
