"""The pipeline config: one YAML file, validated before anything heavy runs.

Sections follow the stages (data, model, grpo, rollout, eval, export, orchestration, continuous), and
`verifier` holds what the code verifier (grpoflow/verifiers/) needs, for any stage that scores.
GRPO keys keep the names users know from TRL/Unsloth `GRPOConfig`. Every key is read by
some stage; a key a stage does not read is a bug.

    cfg = load_config("configs/default.yaml", overrides=["grpo.learning_rate=1e-5"])
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpoflow.answer_format import SYSTEM_PROMPT as DEFAULT_SYSTEM_PROMPT
from grpoflow.errors import ConfigError  # noqa: F401  (re-exported: grpoflow.config.ConfigError)
from grpoflow.trl_parity import NOT_TAKEN


# The largest whole number a config takes: every count, size and seed fits (numpy seeds need < 2**32), and a
# typo'd 10**30 fails here instead of as a MemoryError, an overflow or a run that never ends.
MAX_INT = 2**32 - 1


def _digits(value: int) -> str:
    text = str(value)
    return text if len(text) <= 20 else f"a {len(text.lstrip('-'))}-digit number"


class Section(BaseModel):
    # extra="forbid": a misspelt key fails instead of being ignored. allow_inf_nan=False: .inf / .nan
    # are never a learning rate, a temperature or a clip range.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, v: Any) -> Any:
        values = v if isinstance(v, list) else v.values() if isinstance(v, dict) else [v]
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                raise ValueError(f"{_digits(value)} is larger than any count, size or seed a run takes "
                                 f"(at most {MAX_INT:,})")
        return v


def _check_rewards(specs: list[str]) -> list[str]:
    # Load each reward now, so a misspelt name fails before any model is loaded.
    from grpoflow.rewards import load_reward

    for spec in specs:
        load_reward(spec)
    return specs


class ReasoningGymConfig(Section):
    size: int = Field(2000, gt=0, description="rows generated for `source: reasoning_gym:<task>`")
    options: dict[str, Any] = Field(default_factory=dict, description="the task's own settings, passed to "
                                    "reasoning_gym.create_dataset (e.g. chain_sum: {min_terms: 2, max_digits: 1})")


class DataConfig(Section):
    source: str = Field(
        "gsm8k",
        description="'gsm8k' (packaged, offline), 'reasoning_gym:<task>', a local file or "
        "folder (JSONL, JSON, Parquet, CSV, Arrow) or a Hugging Face dataset id",
    )
    subset: str | None = Field(None, description="Hub dataset config name (e.g. 'main')")
    revision: str | None = Field(None, description="Hub dataset revision")
    train_split: str = "train"
    heldout_split: str | None = Field(
        "test", description="split kept for evaluation; when the source has none, a seeded split"
    )
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    question_column: str = "question"
    answer_column: str = "answer"
    answer_format: Literal["gsm8k", "plain"] = Field(
        "gsm8k", description="gsm8k: worked solution then '#### <final>'; plain: the column is the final answer"
    )
    answer_type: Literal["number", "text"] = "number"
    max_answer_chars: int = Field(
        64, gt=0, description="a longer final answer is taken to give away the reasoning and is rejected"
    )
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_train_rows: int | None = Field(None, gt=0)
    max_heldout_rows: int | None = Field(None, gt=0)
    seed: int = Field(42, ge=0, description="seeds the held-out split when the source has none")
    reasoning_gym: ReasoningGymConfig = ReasoningGymConfig()
    output_dir: Path = Path("artifacts/data")


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRPOFLOW_CACHE_DIR", Path.home() / ".cache" / "grpoflow"))


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (packaged, offline), a local model folder or a Hub model id",
    )
    gguf_file: str | None = Field(None, description="a GGUF file inside name_or_path; converted once to an HF folder")
    revision: str | None = None
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted models are kept here")
    finetune: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora: adapters on a frozen base; qlora: the same on a 4-bit base (GPU); full: every weight")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="compute dtype; float16 trains with loss scaling")
    lora: LoraConfig = LoraConfig()


ScaleRewards = Literal["group", "batch", "none"]
# The held-out figures a checkpoint can be chosen by (grpoflow.evaluation.score_greedy's names): all better higher.
BestMetric = Literal["accuracy", "accuracy_last_number", "format_strict", "format_soft", "reward"]


class FormatWarmupConfig(Section):
    """A short supervised pass on worked solutions rendered in the answer format, before GRPO.

    A model that never writes <reasoning>/<answer> gives every completion of a group the same
    format reward: zero spread, zero advantage, no gradient. A few hundred rows fix that."""

    enabled: bool = True
    rows: int = Field(128, gt=0, description="train rows with a worked solution used for the pass")
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float | None = Field(
        None, gt=0, description="null: 1e-3 for LoRA/QLoRA adapters, 2e-5 for full fine-tuning (a LoRA pass needs "
                                "the higher rate: 128 rows at 1e-4 left SmolLM2's strict format at 0%, at 1e-3 it reached 53% on 32 held-out "
                                "prompts, 2 CPU cores, 2026-12-05)")
    eval_prompts: int = Field(8, gt=0, description="held-out prompts for the format rate before and after")
    source: str | None = Field(None, description="take the worked solutions from this data source instead of the "
                               "training data (same values as data.source, read as GSM8K-style 'solution #### answer'), "
                               "for training data without solutions, e.g. source: gsm8k before a reasoning-gym task")


class GRPOConfig(Section):
    # Optimisation
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int | None = Field(6, gt=0, description="6 keeps `make pipeline` under 15 minutes on 2 CPU cores; see "
                                  "configs/gsm8k-gpu.yaml. null: train for num_train_epochs")
    num_train_epochs: float | None = Field(
        None, gt=0, description="epochs over the train set, counted as TRL counts them (a generation's prompts once, "
                                "with num_iterations); with max_steps the smaller wins. Given without max_steps, "
                                "max_steps is null (TRL's -1)")
    seed: int = Field(42, ge=0)
    # Batching, with TRL's meaning: one generation batch feeds `steps_per_generation`
    # micro-batches of `per_device_train_batch_size` completions.
    num_generations: int = Field(8, ge=2)
    per_device_train_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    steps_per_generation: int | None = Field(None, gt=0)
    generation_batch_size: int | None = Field(None, gt=0)
    num_iterations: int = Field(1, gt=0)
    # Lengths
    max_prompt_length: int = Field(512, gt=0)
    max_completion_length: int = Field(256, gt=0)
    # Loss
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = Field(
        "dapo", description="kernels/reference.py has each formula. 'gspo' (the GRPO guide's) is taken as grpo with "
                            "importance_sampling_level: sequence")
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0, description="null: epsilon. cispo: the cap on the ratio itself "
                                                                "(ScaleRL's eps_max, 5.0 there), which cispo needs set")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="sapo's gate temperature where the advantage is > 0")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="sapo's gate temperature where the advantage is <= 0")
    top_entropy_quantile: float = Field(1.0, ge=0, le=1, description="the policy loss trains on the top this share "
                                        "of tokens by entropy, over all processes (0.2 in 'Beyond the 80/20 rule'); "
                                        "1: every token")
    delta: float | None = Field(None, gt=1)
    beta: float = Field(0.0, ge=0)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: ScaleRewards = "group"
    mask_truncated_completions: bool = False
    # Sampling
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0)
    # Rollouts from another engine (vLLM), or from older weights (rollout.mode: async): truncated importance sampling
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = Field(2.0, gt=0)
    # DAPO's dynamic sampling: groups whose rewards all tie carry no gradient; they are dropped and
    # replaced by groups of further prompts
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards all tie and refill the generation "
                                                      "from further prompts (DAPO)")
    dynamic_sampling_max_draws: int = Field(
        4, ge=1, description="generate calls one generation may take, the first included; groups still missing "
                             "after them are filled with tied groups masked out of the loss")
    # Rewards
    reward_funcs: list[str] = ["correctness", "int", "strict_format", "soft_format", "xmlcount"]
    reward_weights: list[float] | None = None
    # Memory and numerics
    optim: Literal["adamw_torch", "adamw_8bit"] = "adamw_torch"
    gradient_checkpointing: bool = True
    max_tokens_per_forward: int | None = Field(
        None, gt=0, description="a micro-batch's rows go through the training forward and backward in groups of at "
                                "most this many tokens, padding included (rows of like length together), each "
                                "trimmed to its own width; the loss and gradient are the micro-batch's. For long "
                                "completions of uneven length. null: the micro-batch in one forward")
    offload_activations: bool = Field(
        False, description="gradient checkpointing's saved layer inputs wait in pinned host memory and come back for "
                           "the backward, the copies overlapped with compute (grpoflow/train/offload.py); for long "
                           "completions. Needs gradient_checkpointing; not with distributed: fsdp on several processes")
    kernels: Literal["auto", "triton", "chunked", "naive"] = Field(
        "auto", description="log-probs and loss: chunked never makes the [B, T, V] logits (kernels/chunked.py, "
                            "plain torch); triton fuses the lm_head, log-softmax and GRPO loss in Triton kernels "
                            "(kernels/triton_logps.py, triton_loss.py; CUDA only: elsewhere, or without triton "
                            "installed, it runs as chunked after one warning); naive is the model's own forward, "
                            "the reference; auto: triton on a CUDA GPU with triton installed, else chunked")
    torch_compile: bool = Field(
        False, description="compile each decoder layer with torch.compile (regional, dynamic shapes): fewer kernel "
                           "launches and less Python in every forward and backward, the host's share of a step on "
                           "small models; the first steps pay the compile (seconds to minutes). The transformers "
                           "engine generates through the compiled layers too; vLLM has its own")
    expandable_segments: bool | None = Field(
        None, description="torch's CUDA allocator grows and shrinks its segments in place "
                          "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, set for this process before the "
                          "policy loads): less memory held but not handed out where blocks of changing sizes "
                          "come and go, as when generation and training share the card (rollout.mode: async) or "
                          "completions are long. vLLM's pool (rollout.sleep) keeps plain segments of its own. "
                          "null: on with rollout.mode async, off with sync")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp keeps a whole replica of the policy in every process; fsdp shards "
                           "weights, gradients and optimizer state over the processes (FSDP2, per decoder layer) "
                           "for models that do not fit one card (docs/distributed.md). One process: no effect")
    max_nonfinite_steps: int = Field(
        10, gt=0, description="this many optimizer steps in a row with a non-finite loss or gradient stop the run")
    # Checkpoints and logs
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept (the newest)")
    resume_from_checkpoint: bool = Field(True, description="continue from the newest checkpoint of the same run")
    logging_steps: int = Field(1, gt=0)
    log_completions: bool = Field(True, description="log sampled completions with their rewards (TRL's default: false)")
    log_completions_steps: int = Field(10, gt=0, description="every N steps, when log_completions")
    report_to: list[Literal["tensorboard", "wandb"]] = []
    # Evaluation during training (transformers' names): the held-out figures of the evaluation stage
    eval_strategy: Literal["no", "steps"] = Field(
        "no", description="steps: every eval_steps optimizer steps and at the last one, the policy answers the first "
                          "eval_prompts held-out questions greedily, scored as the evaluation stage scores them")
    eval_steps: int | None = Field(None, gt=0, description="null: logging_steps, as in transformers")
    eval_prompts: int = Field(32, gt=0, description="held-out questions (with a gold answer) scored at each evaluation")
    metric_for_best_model: BestMetric | None = Field(
        None, description="the held-out figure that picks the best checkpoint, kept from save_total_limit's pruning; "
                          "null: no best checkpoint (accuracy when load_best_model_at_end)")
    greater_is_better: bool | None = Field(None, description="null: true (every metric_for_best_model is better higher)")
    load_best_model_at_end: bool = Field(False, description="final/ is the best checkpoint's model, not the last step's")
    warmup: FormatWarmupConfig = FormatWarmupConfig()
    output_dir: Path = Path("artifacts/train")

    _rewards_exist = field_validator("reward_funcs")(_check_rewards)

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_rewards_bool(cls, v: Any) -> Any:
        # TRL accepted booleans before it had the string values: True meant per-group.
        if v is True:
            return "group"
        if v is False:
            return "none"
        return v

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _eval_strategy_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads an unquoted `no` as false

    @model_validator(mode="before")
    @classmethod
    def _trl_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("loss_type") == "gspo":  # the GRPO guide's; TRL and grpoflow spell GSPO as a level
            if data.get("importance_sampling_level", "sequence") != "sequence":
                raise ValueError(f"loss_type: gspo is importance_sampling_level: sequence, but "
                                 f"importance_sampling_level is {data['importance_sampling_level']!r}; remove one")
            data.update(loss_type="grpo", importance_sampling_level="sequence")
            _warn_once("gspo", "grpo.loss_type: gspo is GSPO, sequence-level importance sampling: set "
                               "loss_type: grpo (the GSPO paper's per-sequence mean) and importance_sampling_level: "
                               "sequence")
        if data.get("num_train_epochs") is not None and "max_steps" not in data:
            data["max_steps"] = None  # as TRL's max_steps -1: the epochs decide
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "GRPOConfig":
        # batch geometry has one source of truth: the schedule the trainer follows
        from grpoflow.batching import BatchPlan

        BatchPlan.from_config(self)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values but reward_funcs has "
                f"{len(self.reward_funcs)}; give one weight per reward function"
            )
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high ({self.epsilon_high}) must be >= epsilon ({self.epsilon})")
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError("max_steps is null and num_train_epochs is not set: set one of them")
        if self.max_tokens_per_forward is not None and self.top_entropy_quantile < 1.0:
            raise ValueError("max_tokens_per_forward splits a micro-batch into several forwards, and "
                             "top_entropy_quantile < 1 takes its entropy threshold over the whole micro-batch; "
                             "use one of them")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations: true moves gradient checkpointing's saved layer inputs to the host, "
                             "and gradient_checkpointing is false; set gradient_checkpointing: true")
        self._check_loss_keys()
        self._check_eval_keys()
        return self

    def _check_loss_keys(self) -> None:
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ValueError(f"loss_type: cispo caps the ratio at epsilon_high itself (ScaleRL's eps_max), which "
                             f"defaults to epsilon ({self.epsilon}): every token's gradient would be scaled by "
                             f"{self.epsilon} or less. Set epsilon_high, e.g. 5.0 (ScaleRL's, TRL's advice)")
        unused = [f"{k}: {getattr(self, k)}" for k in ("sapo_temperature_pos", "sapo_temperature_neg")
                  if getattr(self, k) != type(self).model_fields[k].default]
        if unused and self.loss_type != "sapo":
            raise ValueError(f"{', '.join(unused)} set, but loss_type is {self.loss_type!r}: only sapo uses them. "
                             f"Set loss_type: sapo, or remove them")

    def _check_eval_keys(self) -> None:
        if self.eval_strategy == "no":
            used = [f"{k}: {getattr(self, k)}" for k in ("eval_steps", "metric_for_best_model", "greater_is_better")
                    if getattr(self, k) is not None] + (["load_best_model_at_end: true"] * self.load_best_model_at_end)
            if used:
                raise ValueError(f"{', '.join(used)} set, but eval_strategy is 'no': nothing is evaluated during "
                                 f"training. Set eval_strategy: steps, or remove them")
            return
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "accuracy"  # transformers picks its loss; the evaluation's headline here
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = True
        every = self.eval_steps or self.logging_steps
        if self.metric_for_best_model is not None and self.save_steps % every:
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({every}"
                             f"{'' if self.eval_steps else ', from logging_steps'}) to pick a best checkpoint "
                             f"(metric_for_best_model): a checkpoint is a candidate when its step was evaluated, "
                             f"as in transformers")


class RolloutConfig(Section):
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM when installed with a GPU, else transformers generate"
    )
    # vLLM (colocated: in the training process, on the training GPU)
    gpu_memory_utilization: float | Literal["auto"] = Field(
        0.3, description="share of the GPU vLLM takes for weights and KV cache; the rest trains. auto: what holds "
                         "its weights and the KV cache of a whole generation at once, plus 4 GiB "
                         "(grpoflow/rollout/sizing.py), for long completions")
    max_model_len: int | None = Field(
        None, gt=0, description="longest prompt + completion vLLM plans for; null: max_prompt_length + "
                                "max_completion_length")
    sleep: bool = Field(True, description="release vLLM's KV cache while the trainer works, take it back to generate")
    share_weights: bool = Field(
        True, description="LoRA and QLoRA: the policy's frozen base weights are vLLM's own tensors, one copy on "
                          "the card (16-bit ones where equal bit for bit; QLoRA's nf4 weights with vLLM's scales)")
    enforce_eager: bool = Field(False, description="no CUDA graphs: faster start, slower generation")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="vLLM's KV cache: auto (the model's dtype) or fp8 (half the memory a token, so twice "
                            "the completion length in the same share; unscaled, so sampling drifts a little from "
                            "the trained policy, which truncated importance sampling corrects)")
    quantization: Literal["auto", "none", "bitsandbytes"] = Field(
        "auto", description="vLLM's weights: bitsandbytes loads them in 4 bits (nf4, as QLoRA's base: a quarter of "
                            "the memory); auto: bitsandbytes when model.finetune is qlora, else none")
    seed_per_prompt: bool = Field(
        False, description="vLLM: each prompt's completions from a seed of its own, so the same on any number of "
                           "processes (the transformers engine always does this); costs vLLM one random draw per "
                           "request at every decoding step. Off: each process's engine draws from seed + rank")
    ignore_eos: bool = Field(False, description="every training completion runs to grpo.max_completion_length, "
                                                "past the end-of-sequence token: for benchmarks of long completions")
    mode: Literal["sync", "async"] = Field(
        "sync", description="async: the next generation is sampled while the trainer trains on this one, from "
                            "weights at most max_staleness optimizer steps old (docs/async-rollouts.md)")
    max_staleness: int = Field(1, ge=1, description="async: optimizer steps the sampling weights may lag the "
                                                    "trained ones (1: one-step-off-policy)")
    async_priority: Literal["normal", "high"] = Field(
        "normal", description="async on a GPU: the CUDA stream priority of the generation ahead. high: its "
                              "decoding kernels are scheduled before the training pass's waiting blocks "
                              "(docs/async-rollouts.md)")
    environment: Literal["single_turn", "python_tool"] = Field(
        "single_turn", description="what answers the model's turns (grpoflow/environments.py, docs/tools.md). "
                                   "python_tool: a turn with a ```python block gets the block's output from the code "
                                   "sandbox as a tool message, and the model goes on; the loss trains on the model's "
                                   "tokens only; grpo.max_completion_length bounds all turns together")
    max_turns: int = Field(4, ge=1, le=64, description="python_tool: the model's turns per episode, at most "
                                                       "(max_turns - 1 tool calls)")
    # where generation runs (docs/rollout-server.md)
    placement: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: the engine is in each training process, on its GPU. server: a rollout "
                                "server process owns rollout.server_gpus and generates for every training "
                                "process; the trainer pushes its weights there after each optimizer step")
    server_address: str | None = Field(
        None, description="server: host:port of a running `grpoflow rollout-server` (its key in GRPOFLOW_ROLLOUT_KEY); "
                          "null: the trainer starts one on rollout.server_gpus and stops it at the end")
    server_gpus: list[int] = Field(
        [], description="server, started by the trainer: the GPUs it owns (CUDA_VISIBLE_DEVICES); []: the card the "
                        "trainer uses, shared")
    server_timeout_s: float = Field(
        600.0, gt=0, description="server: the longest a request (a generation, a weight push, the start) may go "
                                 "unanswered before the server counts as lost: the trainer checkpoints and stops")
    server_push_retries: int = Field(
        3, ge=0, le=100, description="server: a weight push that fails is tried again this many times (a new "
                                     "connection each time), never skipped; then the server counts as lost")

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _a_share(cls, v: float | str) -> float | str:
        if v != "auto" and not 0 < v <= 1:
            raise ValueError(f"{v} is not a share of the card: a number in (0, 1], or auto")
        return v

    @model_validator(mode="after")
    def _server_keys_need_a_server(self) -> "RolloutConfig":
        given = [k for k in ("server_address", "server_gpus") if getattr(self, k)]
        if given and self.placement != "server":
            raise ValueError(f"{' and '.join(given)} set, but placement is {self.placement}: they are for "
                             "placement: server (set it), else drop them")
        return self

    @field_validator("server_address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{v!r} is not host:port (e.g. 10.0.0.5:47000)")
        return v


class EvalConfig(Section):
    max_samples: int | None = Field(
        32, gt=0, description="evaluate on the first N held-out rows (null: all); 32 keeps a CPU run to minutes")
    max_new_tokens: int = Field(320, gt=0, description="a GSM8K solution in the answer format takes 150-300 tokens")
    batch_size: int = Field(16, gt=0, description="prompts per generate call")
    num_samples: int = Field(0, ge=0, description="k sampled completions per question for pass@k and maj@k; 0: greedy only")
    temperature: float = Field(1.0, gt=0, description="for the k samples; pass@1 is always greedy")
    seed: int = Field(42, ge=0)
    reward_funcs: list[str] = ["correctness", "int", "strict_format", "soft_format", "xmlcount"]
    output_dir: Path = Path("artifacts/eval")

    _rewards_exist = field_validator("reward_funcs")(_check_rewards)


Quantization = Literal["f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "q3_k_m", "q2_k"]


# Lowest mean cosine of next-token logits (GGUF vs the merged model) a file needs to be published.
MIN_COSINE = {"f16": 0.999, "q8_0": 0.99, "q6_k": 0.98, "q5_k_m": 0.97, "q5_0": 0.97, "q4_k_m": 0.95,
              "q4_0": 0.95, "q3_k_m": 0.90, "q2_k": 0.80}


class ExportConfig(Section):
    dtype: Literal["float16", "bfloat16"] = "bfloat16"
    quantizations: list[Quantization] = Field(
        ["q4_k_m", "q8_0", "q5_k_m"], description="GGUF quantizations made from the f16 GGUF (always made)")
    min_cosine: dict[Quantization, float] = Field(
        MIN_COSINE, description="per quantization, the mean cosine of next-token logits against the merged "
                                "model a GGUF needs to be published; a file below it is kept locally, marked failed")
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    hub_private: bool = False
    hub_endpoint: str | None = Field(None, description="another Hub (a mirror, or a local test hub); None: the Hub")
    hub_token_secret: str | None = Field(
        None, description="name of a Prefect Secret block holding the token; else the HF_TOKEN variable")
    output_dir: Path = Path("artifacts/export")

    @field_validator("min_cosine", mode="before")
    @classmethod
    def _over_defaults(cls, v: Any) -> Any:
        return {**MIN_COSINE, **v} if isinstance(v, dict) else v  # name only the thresholds to change

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> "ExportConfig":
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub is true but hub_repo_id is not set; set export.hub_repo_id: <user>/<repo>")
        missing = [q for q in ["f16", *self.quantizations] if q not in self.min_cosine]
        if missing:
            raise ValueError(f"min_cosine has no threshold for {', '.join(missing)}; add one per quantization")
        return self


Stage = Literal["prepare", "model", "train", "evaluate", "export"]
ALL_STAGES: tuple[str, ...] = get_args(Stage)


class OrchestrationConfig(Section):
    stages: list[Stage] = list(ALL_STAGES)
    retries: int = Field(1, ge=0, description="retries of a failed stage task")
    retry_delay_seconds: float = Field(10.0, ge=0, description="delay before the first retry; it doubles each retry")
    schedule_cron: str = Field("0 3 * * *", description="when the served pipeline deployment retrains (make serve)")
    train_processes: int = Field(
        1, gt=0, description="the flow runs the train stage as `torchrun --nproc-per-node N` (one process per GPU, "
                             "data parallel); 1: in the flow's own process")

    @field_validator("schedule_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule  # Prefect's own check, as the server applies it

        try:
            CronSchedule(cron=v)
        except ValueError:
            raise ValueError(f"{v!r} is not a cron schedule; five fields, e.g. '0 3 * * *' (03:00 daily)") from None
        return v


class ContinuousConfig(Section):
    """The continuous fine-tuning flow (flows/continuous.py): drops in, gated champions out."""

    drop_dir: Path = Field(Path("artifacts/drops"), description="new training rows arrive here as data files (JSONL, "
                           "JSON, CSV, Parquet, Arrow), in the data section's columns; write a file elsewhere (or "
                           "under a name starting with '.') and rename it in; unusable files go to rejected/")
    heldout: Path | None = Field(None, description="the fixed held-out questions (a file in the drops' columns) that "
                                 "every challenger and the champion are evaluated on")
    min_new_rows: int = Field(64, gt=0, description="a training round starts once this many rows no round has "
                                                     "trained on have arrived")
    gate_metric: Literal["accuracy", "accuracy_last_number", "format_strict", "reward"] = Field(
        "accuracy", description="the held-out figure the challenger is compared on")
    tolerance: float = Field(0.02, ge=0, description="the challenger is promoted unless its gate_metric is below the "
                                                     "champion's by more than this")
    poll_seconds: int = Field(300, gt=0, description="how often the served continuous deployment looks at drop_dir")
    settle_seconds: float = Field(10.0, ge=0, description="a drop changed more recently than this is still being "
                                                         "written: it waits for the next look")
    state_dir: Path = Field(Path("artifacts/continuous"), description="rounds, champions, the row ledger and history")


class VerifierConfig(Section):
    """The code verifier (grpoflow.verifiers.code_reward), wherever a stage scores with it."""

    allow_unsandboxed: bool = Field(
        False, description="where no OS isolation works (no bubblewrap, no user namespaces, not root), run "
                           "model-written code anyway: as your user, with only rlimits and an audit hook in the same "
                           "interpreter between it and your files (home, SSH keys, the Hugging Face token) and the "
                           "network. false: the first verification stops the run, saying what to install")


class PipelineConfig(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    grpo: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    continuous: ContinuousConfig = ContinuousConfig()
    verifier: VerifierConfig = VerifierConfig()

    @model_validator(mode="after")
    def _quantized_rollouts_need_adapters(self) -> "PipelineConfig":
        if self.rollout.quantization == "bitsandbytes" and self.model.finetune == "full":
            raise ValueError("rollout.quantization: bitsandbytes with model.finetune: full: the trained weights are "
                             "pushed into vLLM's after each step, and 4-bit weights cannot take them. Use it with lora "
                             "or qlora (only the adapters travel), or set rollout.quantization: none")
        return self

    @model_validator(mode="after")
    def _fsdp_can_shard(self) -> "PipelineConfig":
        if self.grpo.distributed != "fsdp":
            return self
        # bitsandbytes keeps its own structures beside the tensors FSDP2 would shard (DTensor): a 4-bit weight's
        # quantization state, the 8-bit optimizer's state buffers; neither follows a shard
        if self.model.finetune == "qlora":
            raise ValueError("model.finetune: qlora cannot be sharded (grpo.distributed: fsdp): FSDP2 gathers a "
                             "bitsandbytes 4-bit weight back as a plain tensor, without the quantization state kept "
                             "beside it (an error with the default uint8 storage, silently wrong results with a float "
                             "one: accelerate issue #3983). Use grpo.distributed: ddp (a 4-bit base is small enough "
                             "to replicate), or model.finetune: lora or full with fsdp")
        if self.grpo.optim == "adamw_8bit":
            raise ValueError("grpo.optim: adamw_8bit does not run on FSDP2's sharded parameters (bitsandbytes' "
                             "8-bit AdamW expects plain tensors, not DTensor shards: bitsandbytes issues #89, "
                             "#1633). Use grpo.optim: adamw_torch with grpo.distributed: fsdp")
        return self

    @model_validator(mode="after")
    def _batches_split_over_processes(self) -> "PipelineConfig":
        from grpoflow.batching import BatchPlan

        processes = self.orchestration.train_processes
        if processes > 1:  # the 1-process schedule is checked with grpo
            try:
                BatchPlan.from_config(self.grpo, num_processes=processes).check_groups_stay_on_one_process()
            except ConfigError as e:
                raise ValueError(f"orchestration.train_processes is {processes}: {e}") from None
        return self


# ---------------------------------------------------------------------------------------
# Loading: YAML + --set overrides -> PipelineConfig, or a ConfigError that names the key.


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    raw: dict[str, Any] = {}
    where = "the default config"
    if path is not None:
        path = Path(path)
        where = str(path)
        raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    if overrides:
        where += " with --set " + " ".join(overrides)
    return validate_config(raw, where)


def validate_config(raw: dict[str, Any], where: str = "config") -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe_error(err) for err in e.errors()]
        raise ConfigError(f"invalid config ({where}):\n" + "\n".join(f"  - {line}" for line in lines)) from None
    for warning in config_warnings(cfg):
        _warn_once(warning, f"config ({where}): {warning}")
    return cfg


def config_warnings(cfg: PipelineConfig) -> list[str]:
    """What a valid config does that the field's advice warns against, each naming its keys."""
    from grpoflow.batching import BatchPlan

    plan = BatchPlan.from_config(cfg.grpo, num_processes=cfg.orchestration.train_processes)
    return [f"grpo: {warning}" for warning in plan.warnings()]


_warned: set[str] = set()


def _warn_once(warning: str, message: str) -> None:
    # a config is validated again by every stage and flow that receives it: say each thing once a process
    if warning not in _warned:
        _warned.add(warning)
        logging.getLogger("grpoflow.config").warning(message)


MAX_CONFIG_BYTES = 1 << 20  # a config is a few kilobytes; a bigger file is the wrong file
MAX_YAML_VALUES = 100_000  # values after every alias is expanded: a "billion laughs" file stops here


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes; a config file is a few kilobytes of YAML (at most "
                          f"{MAX_CONFIG_BYTES:,}): is this the right file?")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, offset {e.start}); "
                          f"save the file as UTF-8") from None
    raw = load_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, grpo, ...)")
    return raw


class _Loader(yaml.SafeLoader):
    """safe_load's loader, stricter: a key twice in one mapping is an error (YAML keeps the last one
    silently), and aliases may not expand past MAX_YAML_VALUES values."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, Any] = {}
        for key_node, _ in node.value:  # the mapping's own keys; a `<<` merge may override them
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice in one mapping (also at line "
                        f"{seen[key_node.value].line + 1}); YAML would keep only the last", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str) -> Any:
    """YAML text to Python values, with the loader's limits; errors name `where`, the line and column."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except ValueError as e:  # a constructor's own: an integer of more than 4,300 digits, a bad date
        raise ConfigError(f"{where}: a value YAML cannot read: {_short(str(e), 200)}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()


def _count_values(root: yaml.Node, where: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_YAML_VALUES values, counting shared nodes
    once each (memo) so that the count itself never expands them."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise ConfigError(f"{where}: an alias refers to a node that contains it (a recursive YAML "
                                  f"structure, line {node.start_mark.line + 1}); a config is a tree")
            return sizes[id(node)]
        if depth > 100:
            raise ConfigError(f"{where}: nested more than 100 levels deep (line {node.start_mark.line + 1})")
        sizes[id(node)] = -1
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_YAML_VALUES:,} values once its aliases "
                              f"(*name) are resolved (line {node.start_mark.line + 1}); a config needs a few "
                              f"hundred: is this a YAML alias bomb?")
        sizes[id(node)] = total
        return total

    size(root, 0)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set grpo.learning_rate=1e-5")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    # YAML parsing gives numbers, booleans, null and lists their types: --set grpo.beta=0.04
    try:
        node[parts[-1]] = load_yaml(value, f"--set {item!r}") if value.strip() else value
    except ConfigError as e:
        raise ConfigError(f"{e}; quote a value that is text, e.g. --set '{key.strip()}=\"...\"'") from None


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "literal_error":
        hint = _LOSS_TYPE_HINTS.get(err["input"], _GSPO) if loc[-1] == "loss_type" else ""
        return f"{key}: {_short(err['input'])} is not allowed; allowed values: {err['ctx']['expected']}{hint}"
    if kind == "value_error":
        # our cross-field checks: the section is the location, the message says the rest
        return f"{key}: {err['ctx']['error']}" if key != "(top level)" else str(err["ctx"]["error"])
    if kind == "model_type" or kind == "dict_type":
        return f"{key}: expected a section (a mapping of keys), got {_short(err['input'])}"
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    return f"{key}: {msg} (got {_short(err['input'])})"


_GSPO = "; or 'gspo', the GRPO guide's: grpo with importance_sampling_level: sequence"
# TRL 1.16's loss types grpoflow does not have
_LOSS_TYPE_HINTS = {"luspo": " (luspo, TRL's, is not implemented: gspo is the closest)",
                    "vespo": " (vespo, TRL's, is not implemented: sapo is the closest, a soft gate in place of the clip)"}


def _short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: an error message quotes what was given, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _unknown_key(loc: list[str]) -> str:
    section: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = section.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        section = annotation
    valid = list(section.model_fields)
    bad = loc[-1]
    key = ".".join(loc)
    if section is GRPOConfig and bad in NOT_TAKEN:  # a key of TRL's GRPOConfig: why not, and what instead
        return f"{key}: TRL's key, not grpoflow's: {NOT_TAKEN[bad]}"
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.6)
    if close:
        return f"{key}: unknown key; did you mean '{close[0]}'?"
    return f"{key}: unknown key; valid keys here: {', '.join(valid)}"


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # multi-line strings (the system prompt) as readable | blocks
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, width=100)
