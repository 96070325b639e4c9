"""Rollout engines: prompts (chat messages) in, completions with token ids and log-probs out.

The trainer and the evaluation stage talk to `RolloutEngine` only, so an engine (transformers
generate now, vLLM later) drops in without changing either.
"""

from grpoflow.rollout.base import Completion, RolloutEngine, SamplingParams
from grpoflow.rollout.hf import HFEngine

__all__ = ["Completion", "HFEngine", "RolloutEngine", "SamplingParams"]
