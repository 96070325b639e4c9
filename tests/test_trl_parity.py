"""Every key of TRL's GRPOConfig (1.16.0) is either a grpo key with TRL's meaning or named, with its
reason, in grpoflow/trl_parity.py's NOT_TAKEN, which the README repeats and the config error quotes;
and the GRPO guide's keys (num_train_epochs, log_completions, loss_type: gspo) work."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from grpoflow.batching import BatchPlan
from grpoflow.config import ConfigError, GRPOConfig, load_config
from grpoflow.trl_parity import DEFAULTS_DIFFER, NOT_TAKEN, TRL_GRPO_CONFIG_FIELDS, TRL_VERSION

README = Path(__file__).resolve().parents[1] / "README.md"
OURS = set(GRPOConfig.model_fields)


def _trl_config():
    trl = pytest.importorskip("trl")
    if trl.__version__ != TRL_VERSION:
        pytest.skip(f"TRL {trl.__version__} installed; the list is {TRL_VERSION}'s")
    return trl.GRPOConfig


def test_the_committed_field_list_is_trls():
    assert TRL_GRPO_CONFIG_FIELDS == tuple(f.name for f in dataclasses.fields(_trl_config()))


def test_every_trl_key_is_taken_or_has_a_reason_never_both():
    fields = set(TRL_GRPO_CONFIG_FIELDS)
    assert len(fields) == len(TRL_GRPO_CONFIG_FIELDS) == 191
    missing = sorted(fields - OURS - set(NOT_TAKEN))
    assert not missing, f"TRL keys neither taken nor in NOT_TAKEN: {missing}"
    assert not set(NOT_TAKEN) & OURS, "a key in NOT_TAKEN is taken after all"
    assert set(NOT_TAKEN) <= fields and set(DEFAULTS_DIFFER) <= fields & OURS
    assert all(reason.strip() for reason in NOT_TAKEN.values())


def test_shared_keys_have_trls_default_or_say_why_not():
    trl_config = _trl_config()
    differ = {}
    for field in dataclasses.fields(trl_config):
        if field.name not in OURS:
            continue
        theirs = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if theirs != GRPOConfig.model_fields[field.name].default:
            differ[field.name] = (theirs, GRPOConfig.model_fields[field.name].default)
    assert sorted(set(differ) - set(DEFAULTS_DIFFER)) == [], differ
    assert sorted(set(DEFAULTS_DIFFER) - set(differ)) == []  # no stale entry


@pytest.mark.parametrize("key", sorted(NOT_TAKEN))
def test_a_key_not_taken_is_refused_with_its_reason(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"grpo.{key}=1"])
    assert f"grpo.{key}: TRL's key, not grpoflow's: {NOT_TAKEN[key]}" in str(e.value)


def test_the_readme_table_is_the_code_table():
    text = README.read_text()
    table = text[text.index("<!-- not-taken table"):text.index("<!-- end of the not-taken table -->")]
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (.+) \|$", table, flags=re.M))
    assert rows == NOT_TAKEN


# --- the guide's keys --------------------------------------------------------------------------------


def test_gspo_is_sequence_level_grpo_and_the_log_says_so(caplog, monkeypatch):
    from grpoflow import config

    monkeypatch.setattr(config, "_warned", set())  # said once a process: an earlier test may have said it
    with caplog.at_level(logging.WARNING, logger="grpoflow.config"):
        grpo = load_config(None, ["grpo.loss_type=gspo"]).grpo
    assert (grpo.loss_type, grpo.importance_sampling_level) == ("grpo", "sequence")
    assert "loss_type: gspo is GSPO" in caplog.text and "importance_sampling_level: sequence" in caplog.text
    with pytest.raises(ConfigError, match="gspo is importance_sampling_level: sequence"):
        load_config(None, ["grpo.loss_type=gspo", "grpo.importance_sampling_level=token"])


def test_guide_keys_are_taken():
    grpo = load_config(None, ["grpo.log_completions=false", "grpo.top_entropy_quantile=0.2",
                              "grpo.loss_type=sapo", "grpo.sapo_temperature_neg=2"]).grpo
    assert (grpo.log_completions, grpo.top_entropy_quantile, grpo.sapo_temperature_neg) == (False, 0.2, 2.0)


def test_cispo_needs_its_cap_and_sapo_temperatures_need_sapo():
    with pytest.raises(ConfigError, match="cispo caps the ratio at epsilon_high"):
        load_config(None, ["grpo.loss_type=cispo"])
    assert load_config(None, ["grpo.loss_type=cispo", "grpo.epsilon_high=5"]).grpo.epsilon_high == 5.0
    with pytest.raises(ConfigError, match="sapo_temperature_pos: 2.0 set, but loss_type is 'dapo'"):
        load_config(None, ["grpo.sapo_temperature_pos=2"])


def test_num_train_epochs_alone_leaves_max_steps_to_it():
    grpo = load_config(None, ["grpo.num_train_epochs=2"]).grpo
    assert grpo.max_steps is None and grpo.num_train_epochs == 2.0
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(None, ["grpo.max_steps=null"])


def test_steps_per_epoch_count_as_trls_and_the_smaller_wins():
    # 4 prompts x 8 a generation, steps_per_generation 4 x num_iterations 2 = 8 micro-steps, 3 a step.
    # 50 rows fill 12 whole generations (TRL's RepeatSampler drops the 2 left over): 96 micro-steps,
    # ceil(96 / 3) = 32 steps an epoch; 1.5 epochs = 48 steps
    plan = BatchPlan(per_device_train_batch_size=8, gradient_accumulation_steps=3, num_generations=8,
                     steps_per_generation=4, num_iterations=2)
    assert plan.unique_prompts == 4
    assert plan.steps_per_epoch(50) == 32
    assert plan.max_steps(None, 1.5, 50) == 48
    assert plan.max_steps(40, 1.5, 50) == 40 and plan.max_steps(60, 1.5, 50) == 48
    assert plan.max_steps(60, None, 50) == 60
    assert plan.steps_per_epoch(3) == 1  # fewer rows than a generation: still a step, as TRL's max(..., 1)


def test_the_trainer_takes_the_epochs_steps_from_the_training_set_size(caplog):
    # what stages/train.py's GRPORecipe does once it has read the rows: 1 prompt x 8 a generation, 1 step each
    from grpoflow.batching import with_max_steps

    cfg = load_config(None, ["grpo.num_train_epochs=2"])
    plan = BatchPlan.from_config(cfg.grpo)
    with caplog.at_level(logging.INFO, logger="grpoflow.train"):
        resolved = with_max_steps(cfg, plan, num_rows=30)
    assert resolved.grpo.max_steps == 60 and cfg.grpo.max_steps is None  # a copy; the caller's config stays
    assert "training for 60 steps" in caplog.text
    capped = with_max_steps(load_config(None, ["grpo.num_train_epochs=2", "grpo.max_steps=25"]), plan, num_rows=30)
    assert capped.grpo.max_steps == 25
    unchanged = load_config(None)
    assert with_max_steps(unchanged, plan, num_rows=30) is unchanged
