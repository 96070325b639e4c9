"""grpoflow: turn a language model into a reasoning model with GRPO."""

__version__ = "0.1.0"
