"""Errors that mean the user's settings are wrong (not a bug): shown as one line, exit code 2."""


class ConfigError(ValueError):
    """A user's config is wrong. The message says which key, where, and what is allowed."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row. The message says what to change; a checkpoint is kept."""
