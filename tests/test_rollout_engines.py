"""Which rollout engine runs, and the errors users hit choosing one (vLLM itself runs on the GPU machine)."""

import sys
import types

import pytest
import torch

from grpoflow.config import ConfigError, RolloutConfig
from grpoflow.rollout.load import resolve_engine
from grpoflow.rollout.vllm import _lora_rank_slot


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def fake_vllm(monkeypatch, version: str | None):
    """vLLM importable at `version`, or not importable at all (None)."""
    import grpoflow.rollout.load as load

    monkeypatch.setattr(load, "_warned_fallback", False)
    if version is None:
        monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    else:
        monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))


def test_hf_is_used_on_a_machine_without_a_gpu():
    assert resolve_engine(RolloutConfig(engine="auto")) == "hf"
    with pytest.raises(ConfigError, match="rollout.engine: vllm needs a CUDA GPU"):
        resolve_engine(RolloutConfig(engine="vllm"))


def test_auto_falls_back_to_transformers_with_one_warning(gpu, monkeypatch, caplog):
    fake_vllm(monkeypatch, None)
    with caplog.at_level("WARNING", logger="grpoflow.rollout"):
        assert resolve_engine(RolloutConfig(engine="auto")) == "hf"
        assert resolve_engine(RolloutConfig(engine="auto")) == "hf"
    assert caplog.text.count("auto uses transformers generate") == 1


def test_asking_for_vllm_without_it_says_how_to_install(gpu, monkeypatch):
    fake_vllm(monkeypatch, None)
    with pytest.raises(ConfigError, match=r"vLLM is not installed .*pip install 'grpoflow\[gpu\]'"):
        resolve_engine(RolloutConfig(engine="vllm"))


def test_an_untested_vllm_version_is_named(gpu, monkeypatch):
    fake_vllm(monkeypatch, "0.31.2")
    with pytest.raises(ConfigError, match=r"vllm 0.31.2 is installed; grpoflow is tested with vLLM 0.26.x"):
        resolve_engine(RolloutConfig(engine="vllm"))
    assert resolve_engine(RolloutConfig(engine="auto")) == "hf"


def test_the_tested_version_is_chosen_by_auto(gpu, monkeypatch):
    fake_vllm(monkeypatch, "0.26.0")
    assert resolve_engine(RolloutConfig(engine="auto")) == "vllm"


def test_lora_rank_takes_the_smallest_vllm_slot():
    assert [_lora_rank_slot(r) for r in (4, 8, 16, 17, 64)] == [8, 8, 16, 32, 64]
    with pytest.raises(ConfigError, match="model.lora.r: 600"):
        _lora_rank_slot(600)
