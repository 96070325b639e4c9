"""Where each of TRL's GRPOConfig keys stands here: a config pasted from TRL or from the GRPO guide
either works as it did there, or fails naming the key, why, and what to write instead.

    TRL_GRPO_CONFIG_FIELDS   every field of trl.GRPOConfig 1.16.0 (the version benchmarks/ compares
                             with), written out so the parity test runs without TRL installed
    NOT_TAKEN                the ones grpoflow's grpo section does not take: key -> reason and equivalent
    DEFAULTS_DIFFER          keys taken with TRL's meaning but another default: key -> why

Every other field is a key of grpoflow.config.GRPOConfig with TRL's meaning (tests/test_trl_parity.py
checks all three against the installed TRL where there is one).
"""

from __future__ import annotations

TRL_VERSION = "1.16.0"

TRL_GRPO_CONFIG_FIELDS = (
    'output_dir', 'per_device_train_batch_size', 'num_train_epochs', 'max_steps', 'learning_rate',
    'lr_scheduler_type', 'lr_scheduler_kwargs', 'warmup_steps', 'optim', 'optim_args', 'weight_decay', 'adam_beta1',
    'adam_beta2', 'adam_epsilon', 'optim_target_modules', 'gradient_accumulation_steps',
    'average_tokens_across_devices', 'max_grad_norm', 'label_smoothing_factor', 'bf16', 'fp16', 'bf16_full_eval',
    'fp16_full_eval', 'tf32', 'activation_checkpointing', 'activation_checkpointing_kwargs',
    'gradient_checkpointing', 'gradient_checkpointing_kwargs', 'torch_compile', 'torch_compile_backend',
    'torch_compile_mode', 'use_liger_kernel', 'liger_kernel_config', 'use_cache', 'neftune_noise_alpha',
    'torch_empty_cache_steps', 'auto_find_batch_size', 'logging_strategy', 'logging_steps', 'logging_first_step',
    'log_on_each_node', 'logging_nan_inf_filter', 'include_num_input_tokens_seen', 'log_level', 'log_level_replica',
    'disable_tqdm', 'report_to', 'run_name', 'project', 'trackio_space_id', 'trackio_bucket_id',
    'trackio_static_space_id', 'eval_strategy', 'eval_steps', 'eval_delay', 'per_device_eval_batch_size',
    'prediction_loss_only', 'eval_on_start', 'eval_do_concat_batches', 'eval_use_gather_object',
    'eval_accumulation_steps', 'include_for_metrics', 'batch_eval_metrics', 'save_only_model', 'save_strategy',
    'save_steps', 'save_on_each_node', 'save_total_limit', 'enable_jit_checkpoint', 'push_to_hub', 'hub_token',
    'hub_private_repo', 'hub_model_id', 'hub_strategy', 'hub_always_push', 'hub_revision', 'load_best_model_at_end',
    'metric_for_best_model', 'greater_is_better', 'ignore_data_skip', 'restore_callback_states_from_checkpoint',
    'full_determinism', 'seed', 'data_seed', 'use_cpu', 'accelerator_config', 'parallelism_config',
    'dataloader_drop_last', 'dataloader_num_workers', 'dataloader_pin_memory', 'dataloader_persistent_workers',
    'dataloader_prefetch_factor', 'dataloader_multiprocessing_context', 'dataloader_in_order',
    'remove_unused_columns', 'label_names', 'train_sampling_strategy', 'length_column_name',
    'ddp_find_unused_parameters', 'ddp_bucket_cap_mb', 'ddp_broadcast_buffers', 'ddp_static_graph', 'ddp_backend',
    'ddp_timeout', 'fsdp', 'fsdp_config', 'deepspeed', 'debug', 'skip_memory_metrics', 'do_train', 'do_eval',
    'do_predict', 'resume_from_checkpoint', 'local_rank', 'model_init_kwargs', 'trust_remote_code',
    'router_aux_loss_coef', 'disable_dropout', 'cast_lm_head_to_fp32', 'num_generations', 'num_generations_eval',
    'max_completion_length', 'ds3_gather_for_generation', 'shuffle_dataset', 'pad_to_multiple_of',
    'generation_batch_size', 'steps_per_generation', 'temperature', 'top_p', 'top_k', 'min_p', 'generation_kwargs',
    'chat_template_kwargs', 'repetition_penalty', 'cache_implementation', 'use_vllm', 'vllm_mode',
    'vllm_model_impl', 'vllm_enable_sleep_mode', 'vllm_structured_outputs_regex', 'vllm_server_base_url',
    'vllm_server_host', 'vllm_server_port', 'vllm_server_timeout', 'vllm_group_port', 'vllm_gpu_memory_utilization',
    'vllm_max_model_length', 'vllm_tensor_parallel_size', 'beta', 'num_iterations', 'epsilon', 'delta',
    'epsilon_high', 'sapo_temperature_neg', 'sapo_temperature_pos', 'vespo_k_pos', 'vespo_lambda_pos',
    'vespo_k_neg', 'vespo_lambda_neg', 'importance_sampling_level', 'reward_weights', 'multi_objective_aggregation',
    'scale_rewards', 'loss_type', 'mask_truncated_completions', 'sync_ref_model', 'ref_model_mixup_alpha',
    'ref_model_sync_steps', 'top_entropy_quantile', 'entropy_coef', 'use_adaptive_entropy', 'entropy_coef_min',
    'entropy_coef_max', 'entropy_coef_delta', 'entropy_target', 'max_tool_calling_iterations',
    'vllm_importance_sampling_correction', 'vllm_importance_sampling_mode', 'vllm_importance_sampling_clip_max',
    'vllm_importance_sampling_clip_min', 'off_policy_mask_threshold', 'use_bias_correction_kl', 'log_completions',
    'log_multimodal', 'num_completions_to_print', 'log_unique_prompts', 'log_completions_hub_repo',
    'use_transformers_continuous_batching', 'transformers_continuous_batching_config', 'use_transformers_paged',
    'vllm_importance_sampling_cap'
)

_TORCHRUN = ("per-process key handled by torchrun: orchestration.train_processes starts one process per GPU, "
             "grpo.distributed picks ddp or fsdp (docs/distributed.md)")
_DTYPE = "model.dtype sets the compute dtype (bfloat16, float16 with loss scaling, or float32)"
_HUB = ("the export stage publishes the final model (never checkpoints): export.push_to_hub, export.hub_repo_id, "
        "export.hub_private, export.hub_token_secret")
_VLLM_SERVER = "no vLLM server mode: rollout.engine: vllm runs colocated, in each training process on its GPU"
_LOADER = ("no DataLoader: the train stage draws rows from the prepared Parquet with a seeded sampler "
           "(whole epochs, shuffled by grpo.seed)")
_EVAL = ("evaluation during training answers grpo.eval_prompts held-out questions greedily every grpo.eval_steps "
         "(grpo.eval_strategy: steps); the evaluate stage scores the whole held-out split (eval section)")
_LOGS = "metrics go to the run's log, metrics.jsonl and grpo.report_to (tensorboard, wandb)"
_ADAM = "AdamW with torch's betas (0.9, 0.999) and eps 1e-8; grpo.optim picks adamw_torch or adamw_8bit"
_COMPILE = ("not taken: grpo.torch_compile compiles each decoder layer with inductor's default mode and dynamic "
            "shapes")
_ENTROPY_BONUS = "not taken: no entropy bonus in the loss (top_entropy_quantile trains on high-entropy tokens only)"
_VESPO = "not taken: loss_type vespo is not implemented (cispo and sapo are: kernels/reference.py)"
_REF_SYNC = "not taken: the KL reference stays the base model (TR-DPO's reference updates are not implemented)"
_HF_GENERATE = "rollout.engine: hf generates with transformers' generate, one padded batch per call"

NOT_TAKEN: dict[str, str] = {
    # optimisation
    "lr_scheduler_kwargs": "grpo.lr_scheduler_type takes constant, linear or cosine, without arguments",
    "warmup_steps": "grpo.warmup_ratio: the share of max_steps spent warming the learning rate up",
    "optim_args": _ADAM, "adam_beta1": _ADAM, "adam_beta2": _ADAM, "adam_epsilon": _ADAM,
    "optim_target_modules": "model.lora.target_modules (LoRA); model.finetune: full trains every weight",
    "label_smoothing_factor": "not taken: GRPO has no labels to smooth",
    "average_tokens_across_devices": "loss_type dapo and cispo already divide by the tokens of every process",
    # dtype, memory, speed
    "bf16": _DTYPE, "fp16": _DTYPE, "bf16_full_eval": _DTYPE, "fp16_full_eval": _DTYPE,
    "tf32": "not taken: torch's default matmul precision stands",
    "activation_checkpointing": "grpo.gradient_checkpointing",
    "activation_checkpointing_kwargs": "grpo.gradient_checkpointing (transformers' defaults)",
    "gradient_checkpointing_kwargs": "grpo.gradient_checkpointing (transformers' defaults)",
    "torch_compile_backend": _COMPILE, "torch_compile_mode": _COMPILE,
    "use_liger_kernel": ("grpo.kernels: auto (default: triton on a GPU, chunked elsewhere), chunked or triton "
                         "compute log-probs without the [B, T, V] logits"),
    "liger_kernel_config": "grpo.kernels: chunked or triton",
    "cast_lm_head_to_fp32": "grpo.kernels: chunked and triton take log-softmax and entropy in float32 already",
    "use_cache": "not taken: generation uses the KV cache, the training forward does not",
    "neftune_noise_alpha": "not taken: no embedding noise (NEFTune is for supervised fine-tuning)",
    "torch_empty_cache_steps": "not taken: the CUDA cache is left to torch (vLLM's is released by rollout.sleep)",
    "auto_find_batch_size": ("not taken (TRL refuses it too): a smaller batch breaks whole prompt groups; lower "
                             "grpo.per_device_train_batch_size"),
    "use_cpu": "not taken: CUDA when there is a GPU, else the CPU",
    # processes
    "local_rank": _TORCHRUN, "ddp_find_unused_parameters": _TORCHRUN, "ddp_bucket_cap_mb": _TORCHRUN,
    "ddp_broadcast_buffers": _TORCHRUN, "ddp_static_graph": _TORCHRUN, "ddp_backend": _TORCHRUN,
    "ddp_timeout": _TORCHRUN, "fsdp": "grpo.distributed: fsdp (FSDP2, one unit per decoder layer)",
    "fsdp_config": "grpo.distributed: fsdp (FSDP2, one unit per decoder layer)",
    "deepspeed": "not taken: no DeepSpeed; grpo.distributed: fsdp shards weights, gradients and optimizer state",
    "accelerator_config": _TORCHRUN, "parallelism_config": _TORCHRUN, "log_on_each_node": _TORCHRUN,
    "save_on_each_node": _TORCHRUN, "log_level_replica": _TORCHRUN,
    "ds3_gather_for_generation": "not taken: no DeepSpeed; under fsdp the weights are gathered for generation",
    # logging
    "logging_strategy": "grpo.logging_steps (steps only)", "logging_first_step": "grpo.logging_steps",
    "logging_nan_inf_filter": "grpo.max_nonfinite_steps: a non-finite step is skipped, too many in a row stop the run",
    "include_num_input_tokens_seen": _LOGS, "log_level": _LOGS, "disable_tqdm": _LOGS, "run_name": _LOGS,
    "project": _LOGS, "trackio_space_id": _LOGS, "trackio_bucket_id": _LOGS, "trackio_static_space_id": _LOGS,
    "log_multimodal": "not taken: text only", "num_completions_to_print": "grpo.log_completions_steps",
    "log_unique_prompts": "grpo.log_completions_steps", "log_completions_hub_repo": "not taken: completions go to "
    "the run's completions log",
    # evaluation
    "eval_delay": _EVAL, "per_device_eval_batch_size": "eval.batch_size", "prediction_loss_only": _EVAL,
    "eval_on_start": _EVAL, "eval_do_concat_batches": _EVAL, "eval_use_gather_object": _EVAL,
    "eval_accumulation_steps": _EVAL, "include_for_metrics": _EVAL, "batch_eval_metrics": _EVAL,
    "num_generations_eval": "eval.num_samples (k samples per question for pass@k and maj@k); greedy by default",
    "do_train": "orchestration.stages", "do_eval": "orchestration.stages", "do_predict": "orchestration.stages",
    # checkpoints, the Hub
    "save_strategy": "grpo.save_steps (steps only)", "save_only_model": "not taken: a checkpoint holds the "
    "optimizer and sampler state so that the run resumes exactly",
    "enable_jit_checkpoint": "not taken: SIGTERM is answered with a checkpoint at the end of the step",
    "ignore_data_skip": "grpo.resume_from_checkpoint resumes the sampler where it stopped",
    "restore_callback_states_from_checkpoint": "not taken: no callbacks",
    "push_to_hub": _HUB, "hub_token": _HUB, "hub_private_repo": _HUB, "hub_model_id": _HUB, "hub_strategy": _HUB,
    "hub_always_push": _HUB, "hub_revision": _HUB,
    # data
    "full_determinism": "grpo.seed seeds everything; rollout.seed_per_prompt makes vLLM's sampling per prompt",
    "data_seed": "grpo.seed", "shuffle_dataset": _LOADER, "dataloader_drop_last": _LOADER,
    "dataloader_num_workers": _LOADER, "dataloader_pin_memory": _LOADER, "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER, "dataloader_multiprocessing_context": _LOADER,
    "dataloader_in_order": _LOADER, "remove_unused_columns": _LOADER, "label_names": _LOADER,
    "train_sampling_strategy": _LOADER, "length_column_name": _LOADER,
    "pad_to_multiple_of": "not taken: each forward is as wide as its own rows, no padding past its longest",
    "debug": "not taken", "skip_memory_metrics": "not taken: the run logs the peak GPU memory",
    # model
    "model_init_kwargs": "the model section: name_or_path, revision, dtype, finetune (lora, qlora, full)",
    "trust_remote_code": "not taken: only architectures transformers ships are loaded",
    "router_aux_loss_coef": "not taken: no mixture-of-experts router loss",
    "disable_dropout": "not taken: the model trains with its own config's dropout (model.lora.dropout for LoRA's)",
    # generation
    "generation_kwargs": "the sampling keys: temperature, top_p, top_k, min_p, repetition_penalty",
    "chat_template_kwargs": "not taken: the tokenizer's chat template with data.system_prompt",
    "cache_implementation": _HF_GENERATE,
    "use_transformers_continuous_batching": _HF_GENERATE, "transformers_continuous_batching_config": _HF_GENERATE,
    "use_transformers_paged": _HF_GENERATE,
    "max_tool_calling_iterations": "not taken: no tool calling",
    "use_vllm": "rollout.engine: vllm (auto picks it where it is installed with a GPU)",
    "vllm_mode": _VLLM_SERVER, "vllm_server_base_url": _VLLM_SERVER, "vllm_server_host": _VLLM_SERVER,
    "vllm_server_port": _VLLM_SERVER, "vllm_server_timeout": _VLLM_SERVER, "vllm_group_port": _VLLM_SERVER,
    "vllm_tensor_parallel_size": "not taken: each process's engine runs on its own GPU",
    "vllm_model_impl": "not taken: vLLM's own implementation of the model",
    "vllm_gpu_memory_utilization": "rollout.gpu_memory_utilization",
    "vllm_max_model_length": "rollout.max_model_len",
    "vllm_enable_sleep_mode": "rollout.sleep",
    "vllm_structured_outputs_regex": "not taken: no structured outputs",
    "vllm_importance_sampling_mode": ("token_truncate only: grpo.vllm_importance_sampling_correction with "
                                      "grpo.vllm_importance_sampling_cap (TRL's C_max)"),
    "vllm_importance_sampling_clip_max": "grpo.vllm_importance_sampling_cap",
    "vllm_importance_sampling_clip_min": "not taken: the weights are truncated from above only",
    # loss
    "vespo_k_pos": _VESPO, "vespo_lambda_pos": _VESPO, "vespo_k_neg": _VESPO, "vespo_lambda_neg": _VESPO,
    "multi_objective_aggregation": ("sum_then_normalize only: rewards are summed (times grpo.reward_weights), then "
                                    "normalised by grpo.scale_rewards"),
    "sync_ref_model": _REF_SYNC, "ref_model_mixup_alpha": _REF_SYNC, "ref_model_sync_steps": _REF_SYNC,
    "entropy_coef": _ENTROPY_BONUS, "use_adaptive_entropy": _ENTROPY_BONUS, "entropy_coef_min": _ENTROPY_BONUS,
    "entropy_coef_max": _ENTROPY_BONUS, "entropy_coef_delta": _ENTROPY_BONUS, "entropy_target": _ENTROPY_BONUS,
    "off_policy_mask_threshold": "not taken: no off-policy sequence masking (DeepSeek-V3.2's)",
    "use_bias_correction_kl": ("not taken: with grpo.beta > 0 the KL term is k3 alone, as TRL's "
                               "use_bias_correction_kl: false (TRL 1.16 defaults to true: k3 times the ratio)"),
}

DEFAULTS_DIFFER: dict[str, str] = {
    "output_dir": "artifacts/train (TRL: trainer_output)",
    "max_steps": "6, so `make pipeline` runs in under 15 minutes on a CPU (TRL: -1, train for num_train_epochs)",
    "num_train_epochs": "null: grpo.max_steps decides (TRL: 3.0, used where max_steps is -1)",
    "lr_scheduler_type": "constant (TRL: linear)",
    "optim": "adamw_torch, fused on CUDA (TRL: adamw_torch_fused)",
    "logging_steps": "1: every step of a short run is logged (TRL: 10)",
    "report_to": "[] (TRL: 'none'): the same, no tracker",
    "save_steps": "50 (TRL: 500)",
    "save_total_limit": "2: checkpoints hold the optimizer state (TRL: null, keep all)",
    "resume_from_checkpoint": "true: the same run resumes its newest checkpoint (TRL: null, start over)",
    "max_completion_length": "256 (TRL: 512)",
    "min_p": "0.0, off (TRL: null, off)",
    "vllm_importance_sampling_cap": "2.0 (TRL 1.16: deprecated, null, so vllm_importance_sampling_clip_max's 3.0)",
    "log_completions": "true: completions are logged every log_completions_steps (TRL: false)",
}
