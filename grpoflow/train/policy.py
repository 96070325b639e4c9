"""Build what gets trained: the policy (full, LoRA or QLoRA), its optimizer, schedule and scaler."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from dataclasses import dataclass

import torch

from grpoflow.config import ConfigError, GRPOConfig, ModelConfig
from grpoflow.train.distributed import whole_weights
from grpoflow.train.logps import completion_logps
from grpoflow.train.offload import ActivationOffload, enable_offload

log = logging.getLogger("grpoflow.train")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Policy:
    model: torch.nn.Module  # a peft model under LoRA/QLoRA
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # compute dtype (autocast)
    is_peft: bool
    ddp: torch.nn.Module | None = None  # the training forward under DDP (grpoflow/train/distributed.py)
    fsdp: torch.nn.Module | None = None  # FSDP2's root module when the model is sharded (shard_fsdp)

    def run(self, fn, *args, **kwargs):
        """fn(self.model, *args, **kwargs): every forward of the model goes through here. Sharded,
        it runs as FSDP2's root forward, which gathers the weights outside the decoder layers first
        (distributed.FSDPRoot says why); every process must make the same calls."""
        if self.fsdp is None:
            return fn(self.model, *args, **kwargs)
        out = self.fsdp(fn, *args, **kwargs)
        if not torch.is_grad_enabled():
            # FSDP2's root keeps its gathered weights until the backward; without one, give them back
            # now (else model.parameters() would hand out the whole tensors instead of the shards)
            self.fsdp.reshard()
        return out

    def train_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, **kwargs):
        """The forward whose backward trains: through DDP under data parallelism (DDP all-reduces
        the gradients of a forward through its wrapper only), else the model's own (FSDP2's hooks
        reduce-scatter the gradients of a sharded one)."""
        if self.ddp is not None:
            return self.ddp(input_ids, attention_mask, completion_len, **kwargs)
        return self.run(completion_logps, input_ids, attention_mask, completion_len, **kwargs)

    def generate(self, **kwargs):
        """The model's generate. Sharded, every unit's weights are gathered once, before it, and
        sharded again after it (distributed.whole_weights): the decoding steps make no collective,
        so each process stops when its own completions end. synced_gpus stays off: transformers
        turns it on for an FSDP model, an all-reduce every step that would keep a process that is
        done stepping until every process is."""
        with whole_weights(self.fsdp) if self.fsdp is not None else contextlib.nullcontext():
            return self.run(lambda model: model.generate(synced_gpus=False, **kwargs))

    def no_sync(self, skip: bool):
        """skip=True for a micro-step before the last of an optimizer step: DDP leaves out its
        all-reduce and reduces the accumulated gradients once, at the last. FSDP2 reduce-scatters
        every micro-step's instead: skipping it would hold whole unsharded gradients in between."""
        return self.ddp.no_sync() if skip and self.ddp is not None else contextlib.nullcontext()

    def autocast(self):
        # weights stay float32 under full fine-tuning (Adam needs them), LoRA adapters too;
        # matmuls run in the compute dtype
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # What an engine with its own copy of the weights (vLLM) syncs from, whole under FSDP2: the policy
    # hands them out, so that the rollout package never imports the train package.
    def whole_trained_weights(self, *, every_process: bool = False) -> dict[str, torch.Tensor] | None:
        """checkpoint.gather_trained: the trained weights (adapters alone under LoRA) as whole tensors;
        None when the model is not sharded (its own state dict is whole)."""
        from grpoflow.train.checkpoint import gather_trained

        return gather_trained(self, every_process=every_process)

    def whole_parameters(self):
        """distributed.full_parameters: (name, whole tensor) for every weight, FSDP2's shards gathered."""
        from grpoflow.train.distributed import full_parameters

        return full_parameters(self.model)


def load_policy(model_cfg: ModelConfig, grpo: GRPOConfig, model_path: str, device: torch.device | None = None, *,
                to_device: bool = True) -> Policy:
    """device: this process's (cuda:LOCAL_RANK under torchrun); default the GPU if any, else the CPU.
    to_device=False leaves the weights in host memory: FSDP2 moves each process's shard to the
    device as it shards the model (grpoflow/train/distributed.py), so the whole model is never on one card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[model_cfg.dtype]
    if device.type == "cpu" and model_cfg.finetune == "qlora":
        raise ConfigError("model.finetune: qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use lora or full")
    if device.type == "cpu" and grpo.optim == "adamw_8bit":
        raise ConfigError("grpo.optim: adamw_8bit needs a CUDA GPU (bitsandbytes); on CPU use adamw_torch")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.chat_template is None:
        # a base model without one: a plain ChatML template, the most common convention
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        log.warning("%s has no chat template: using a default ChatML one", model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    kwargs = {}
    if model_cfg.finetune == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    # A frozen base can live in the compute dtype (half the memory); trained weights stay float32.
    weights_dtype = dtype if model_cfg.finetune in ("lora", "qlora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights_dtype, **kwargs)
    if model_cfg.finetune != "qlora" and to_device:
        model.to(device)

    if grpo.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    is_peft = model_cfg.finetune in ("lora", "qlora")
    if is_peft:
        from peft import LoraConfig, get_peft_model

        # QLoRA is prepared as LoRA is, not with peft's prepare_model_for_kbit_training: that casts every
        # tensor left in 16 bits (embeddings, lm_head, norms) to float32, 2 GB more for an 8B's vocabulary,
        # an lm_head the loss path reads in float32, and a trainer that computes something other than the
        # 16-bit sampler it shares rollouts with; it also turns checkpointing back to reentrant.
        if grpo.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
        lora = model_cfg.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if grpo.offload_activations:  # on the checkpointed layers as peft leaves them
        if grpo.distributed == "fsdp" and not to_device:
            raise ConfigError("grpo.offload_activations is not supported with grpo.distributed: fsdp on several "
                              "processes (FSDP2 gathers a layer's weights around its call, which the recompute in "
                              "the backward skips); use ddp, or offload_activations: false")
        layers = enable_offload(model, ActivationOffload())
        log.info("activation offload: the inputs of %d checkpointed layers wait in host memory", layers)
    if grpo.torch_compile:  # last: the layers as peft and the offload leave them
        layers = compile_layers(model, device, offloaded=grpo.offload_activations)
        log.info("torch.compile: %d decoder layers compiled as they first run (the first steps pay it)", layers)
    # from_pretrained returns eval mode, where gradient checkpointing is off: train mode, or the
    # whole forward's activations stay alive for the backward (16.7 GiB instead of 3 here, measured)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("policy: %s, %s, %s compute on %s; %.2fM of %.1fM parameters trained", model_path,
             model_cfg.finetune, model_cfg.dtype, device, n_train / 1e6, n_all / 1e6)
    return Policy(model, tokenizer, device, dtype, is_peft)


def compile_layers(model: torch.nn.Module, device: torch.device, *, offloaded: bool = False) -> int:
    """grpo.torch_compile: each decoder layer compiled on its own (regional compilation), the way
    torchtitan does it: the layers share one code, so it compiles once (not the minutes of the whole
    model), and the head stays with grpo.kernels' fused log-probs. Dynamic shapes from the start: a
    step's widths change every step, and a compile per width would stall the run. Dynamo traces the
    gradient checkpointing inside the layer, so the backward's recompute runs compiled too; the
    offload's autograd function stays eager around the compiled layer. Returns the number of layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            raise ConfigError(f"grpo.torch_compile: true on CPU needs a C++ compiler ({compiler}, from $CXX or "
                              f"g++) on PATH for torch's inductor; install one, or set grpo.torch_compile: false")
    # A checkpointed layer's forward sets one of transformers' context variables (its output capture).
    # Dynamo will not trace a side effect that the recompute in the backward would not replay, and
    # without this the layer silently runs eager in every training forward; the recompute needs no
    # such capture. torchtitan and transformers' own compile benchmarks set it too.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"grpo.torch_compile: true compiles the model's decoder layers, and "
                          f"{type(model).__name__} has none that transformers marks as such; set "
                          f"grpo.torch_compile: false")
    if offloaded and _draws_random_numbers(layers[0], model):
        # the offload runs a layer's forward without autograd and its recompute with it: eagerly the
        # two draw the same dropout masks from the restored RNG state, compiled they are two graphs
        # whose random numbers differ, and the gradient would be another forward's (measured on CPU)
        raise ConfigError("grpo.torch_compile with grpo.offload_activations needs layers without dropout (the "
                          "compiled recompute would draw other masks than the forward); set model.lora.dropout: 0 "
                          "and the model's attention_dropout to 0, or turn one of the two off")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _draws_random_numbers(layer: torch.nn.Module, model: torch.nn.Module) -> bool:
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules())
    config = getattr(model, "config", None)
    return dropout or float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0


def make_optimizer(policy: Policy, grpo: GRPOConfig) -> torch.optim.Optimizer:
    params = policy.trainable_parameters()
    if grpo.optim == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=grpo.learning_rate, weight_decay=grpo.weight_decay)
    # fused on CUDA: one kernel and no per-step temporaries the size of the weights (foreach's)
    fused = policy.device.type == "cuda"
    return torch.optim.AdamW(params, lr=grpo.learning_rate, weight_decay=grpo.weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, grpo: GRPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total = grpo.max_steps
    warmup = math.ceil(grpo.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if grpo.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if grpo.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_scaler(policy: Policy) -> torch.amp.GradScaler:
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
    enabled = policy.dtype == torch.float16
    if policy.fsdp is not None:
        # each process sees its shard of the gradients only: FSDP's scaler agrees on "found inf" over all
        # processes, so that they skip the same steps and keep the same scale
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(policy.device.type, enabled=enabled)
    return torch.amp.GradScaler(policy.device.type, enabled=enabled)


DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
