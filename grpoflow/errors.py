"""Errors that mean what the user gave is wrong (not a bug): shown as one line, exit code 2, never retried."""


class UserError(Exception):
    """Settings, files or credentials that no retry fixes. The message says what, where, and what to do.
    Each stage's own kinds subclass it (ConfigError, SourceError, DataError, ModelError, ...)."""


class ConfigError(UserError, ValueError):
    """A user's config is wrong. The message says which key, where, and what is allowed."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite steps in a row. The message says what to change; a checkpoint is kept."""
