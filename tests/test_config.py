import subprocess
import sys
from pathlib import Path

import pytest

from grpoflow.batching import BatchPlan
from grpoflow.config import ConfigError, PipelineConfig, config_warnings, load_config, to_yaml, validate_config

ROOT = Path(__file__).resolve().parents[1]


def error_of(raw=None, overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as e:
        if raw is not None:
            validate_config(raw, "test.yaml")
        else:
            load_config(path, list(overrides))
    return str(e.value)


def test_default_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "default.yaml") == PipelineConfig()


def test_printed_config_loads_back_to_the_same(tmp_path):
    cfg = load_config(None, ["grpo.learning_rate=3e-6", "data.max_train_rows=100"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_unknown_key_names_the_closest_valid_one():
    assert error_of({"grpo": {"lerning_rate": 1e-5}}) == (
        "invalid config (test.yaml):\n  - grpo.lerning_rate: unknown key; did you mean 'learning_rate'?")
    assert error_of({"grpoo": {}}) == "invalid config (test.yaml):\n  - grpoo: unknown key; did you mean 'grpo'?"
    assert error_of({"data": {"reasoning_gym": {"sise": 3}}}) == (
        "invalid config (test.yaml):\n  - data.reasoning_gym.sise: unknown key; did you mean 'size'?")


def test_unknown_key_without_a_close_name_lists_the_valid_ones():
    message = error_of({"rollout": {"zzz": 1}})
    assert message == ("invalid config (test.yaml):\n  - rollout.zzz: unknown key; valid keys here: engine, "
                       "gpu_memory_utilization, max_model_len, sleep, share_weights, enforce_eager, kv_cache_dtype, "
                       "quantization, seed_per_prompt, ignore_eos, mode, max_staleness, async_priority, environment, "
                       "max_turns, placement, server_address, server_gpus, server_timeout_s, server_push_retries")


def test_bad_value_names_the_key_and_the_allowed_values():
    assert error_of({"grpo": {"loss_type": "ppo"}}) == (
        "invalid config (test.yaml):\n  - grpo.loss_type: 'ppo' is not allowed; "
        "allowed values: 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo' or 'sapo'; or 'gspo', the GRPO guide's: grpo "
        "with importance_sampling_level: sequence")
    assert error_of({"grpo": {"importance_sampling_level": "seq"}}) == (
        "invalid config (test.yaml):\n  - grpo.importance_sampling_level: 'seq' is not allowed; "
        "allowed values: 'token' or 'sequence'")


def test_out_of_range_and_wrong_type_values():
    assert error_of({"grpo": {"learning_rate": -1}}) == (
        "invalid config (test.yaml):\n  - grpo.learning_rate: input should be greater than 0 (got -1)")
    assert error_of({"grpo": {"num_generations": "many"}}) == (
        "invalid config (test.yaml):\n  - grpo.num_generations: input should be a valid integer, "
        "unable to parse string as an integer (got 'many')")
    assert error_of({"data": "gsm8k"}) == (
        "invalid config (test.yaml):\n  - data: expected a section (a mapping of keys), got 'gsm8k'")


def test_every_error_is_reported_at_once():
    message = error_of({"grpo": {"loss_type": "x", "beta": -1}, "data": {"heldout_fraction": 2}})
    assert message.count("\n  - ") == 3


def test_batch_geometry_is_checked():
    # the rules and their wording live in grpoflow/batching.py (tests/test_batching.py); here: they run at load
    assert error_of({"grpo": {"num_generations": 3}}).startswith(
        "invalid config (test.yaml):\n  - grpo: the generation batch is not a whole number of prompt groups: "
        "effective_batch_size = steps_per_generation 1 x num_processes 1 x per_device_train_batch_size 8 = 8 "
        "completions, not a multiple of num_generations (3).")
    assert "steps_per_generation (2) and generation_batch_size (16) are both set" in error_of(
        {"grpo": {"steps_per_generation": 2, "generation_batch_size": 16}})
    assert "generation_batch_size (12) must be a multiple of num_processes x per_device_train_batch_size" in error_of(
        {"grpo": {"generation_batch_size": 12, "num_generations": 4}})
    validate_config({"grpo": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "num_generations": 8}})


def test_cross_field_checks():
    assert "reward_weights has 1 values but reward_funcs has 5" in error_of({"grpo": {"reward_weights": [1.0]}})
    assert "epsilon_high (0.1) must be >= epsilon (0.2)" in error_of({"grpo": {"epsilon_high": 0.1}})
    assert error_of({"export": {"push_to_hub": True}}) == (
        "invalid config (test.yaml):\n  - export: push_to_hub is true but hub_repo_id is not set; "
        "set export.hub_repo_id: <user>/<repo>")


def test_fsdp_refuses_what_it_cannot_shard():
    fsdp = {"distributed": "fsdp"}
    assert validate_config({"grpo": fsdp, "orchestration": {"train_processes": 2}}).grpo.distributed == "fsdp"
    assert error_of({"grpo": fsdp, "model": {"finetune": "qlora"}}).startswith(
        "invalid config (test.yaml):\n  - model.finetune: qlora cannot be sharded (grpo.distributed: fsdp): FSDP2 "
        "gathers a bitsandbytes 4-bit weight back as a plain tensor")
    assert "grpo.optim: adamw_8bit does not run on FSDP2's sharded parameters" in error_of(
        {"grpo": {**fsdp, "optim": "adamw_8bit"}})
    validate_config({"model": {"finetune": "qlora"}, "grpo": {"optim": "adamw_8bit"}})  # both fine under ddp
    assert "grpo.distributed: 'zero3' is not allowed; allowed values: 'ddp' or 'fsdp'" in error_of(
        {"grpo": {"distributed": "zero3"}})


def test_trl_boolean_scale_rewards_still_works():
    assert validate_config({"grpo": {"scale_rewards": True}}).grpo.scale_rewards == "group"
    assert validate_config({"grpo": {"scale_rewards": False}}).grpo.scale_rewards == "none"


def test_overrides_are_typed_like_yaml():
    cfg = load_config(None, ["grpo.learning_rate=1e-5", "grpo.beta=0.04", "grpo.mask_truncated_completions=true",
                             "grpo.reward_funcs=[correctness, xmlcount]", "data.max_train_rows=null"])
    assert cfg.grpo.learning_rate == 1e-5
    assert cfg.grpo.beta == 0.04
    assert cfg.grpo.mask_truncated_completions is True
    assert cfg.grpo.reward_funcs == ["correctness", "xmlcount"]
    assert cfg.data.max_train_rows is None


def test_override_errors_name_the_override():
    assert error_of(overrides=["grpo.learning_rate"]) == (
        "--set 'grpo.learning_rate': expected KEY=VALUE, e.g. --set grpo.learning_rate=1e-5")
    assert error_of(overrides=["grpo.beta=0", "grpo.beta.x=1"]) == (
        "--set 'grpo.beta.x=1': grpo.beta is a value, not a section")
    assert error_of(overrides=["grpo.lerning_rate=1"]).startswith(
        "invalid config (the default config with --set grpo.lerning_rate=1):\n  - grpo.lerning_rate: unknown key")


def test_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  learning_rate: 1e-5\n   beta: 0\n")
    message = error_of(path=bad)
    assert message.startswith(f"{bad}: not valid YAML at line 3, column")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert error_of(path=tmp_path / "list.yaml") == (
        f"{tmp_path / 'list.yaml'}: the top level must be a mapping of sections (data, model, grpo, ...)")
    assert error_of(path=tmp_path / "missing.yaml") == f"config file not found: {tmp_path / 'missing.yaml'}"
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == PipelineConfig()


def test_a_bad_value_fails_before_any_model_is_loaded():
    # In a fresh interpreter: the CLI must reject the config without importing transformers or torch.
    code = ("import sys; from grpoflow.cli import main; rc = main(['run', '--set', 'grpo.loss_type=ppo']); "
            "print(rc, 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "2 False False", out.stderr
    assert "grpo.loss_type: 'ppo' is not allowed; allowed values: 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo' or " \
        "'sapo'; or 'gspo'" in out.stderr


def test_reward_names_are_checked_with_the_config():
    message = error_of({"grpo": {"reward_funcs": ["correctnes", "xmlcount"]}})
    assert message.startswith("invalid config (test.yaml):\n  - grpo.reward_funcs: unknown reward 'correctnes'. "
                              "Did you mean 'correctness'?")


def test_cli_errors_show_brackets_as_typed():
    # rich markup must not eat '[...]' in a message
    code = ("from grpoflow.cli import main; main(['config', '--set', 'grpo.reward_funcs=[correctnes]'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "--set grpo.reward_funcs=[correctnes]" in out.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    load_config(path)


def test_config_warnings_name_the_rule_and_are_logged_once(caplog):
    from grpoflow import config as config_module

    config_module._warned.clear()
    raw = {"grpo": {"num_generations": 4, "per_device_train_batch_size": 8}}
    with caplog.at_level("WARNING", logger="grpoflow.config"):
        cfg = validate_config(raw, "a.yaml")
        validate_config(raw, "a.yaml with --set x")  # stages validate the same config again
    assert config_warnings(cfg) == [f"grpo: {w}" for w in BatchPlan.from_config(cfg.grpo).warnings()]
    [record] = caplog.records
    assert record.getMessage().startswith(
        "config (a.yaml): grpo: unique_prompts = effective_batch_size 8 / num_generations 4 = 2: the GRPO batching "
        "guide says it must be > 2")
    big = validate_config({"grpo": {"num_generations": 4, "per_device_train_batch_size": 12}})
    assert config_warnings(big) == []
    # processes multiply the prompts of a generation
    assert config_warnings(validate_config({**raw, "orchestration": {"train_processes": 2}})) == []


def test_4_bit_rollout_weights_with_full_fine_tuning_are_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"rollout\.quantization: bitsandbytes with model\.finetune: full"):
        validate_config({"model": {"finetune": "full"}, "rollout": {"quantization": "bitsandbytes"}}, "c.yaml")
    validate_config({"model": {"finetune": "full"}, "rollout": {"kv_cache_dtype": "fp8"}}, "c.yaml")  # fine
