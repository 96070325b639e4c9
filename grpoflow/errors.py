"""Errors that mean what the user gave is wrong (not a bug): shown as one line, exit code 2, never retried."""

import json
import os


class UserError(Exception):
    """Settings, files or credentials that no retry fixes. The message says what, where, and what to do.
    Each stage's own kinds subclass it (ConfigError, SourceError, DataError, ModelError, ...)."""


# A process launched for the user (torchrun's ranks) reports its user error in this file, as JSON: the
# launcher raises it as a UserError instead of guessing from the log (torchrun exits 1 whatever failed).
ERROR_FILE_ENV = "GRPOFLOW_ERROR_FILE"


def report_user_error(error: UserError) -> None:
    """Write `error` where the launcher reads it ($GRPOFLOW_ERROR_FILE, one file a rank); no-op elsewhere."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(f"{path}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump({"kind": type(error).__name__, "message": str(error)}, f)


class ConfigError(UserError, ValueError):
    """A user's config is wrong. The message says which key, where, and what is allowed."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite steps in a row. The message says what to change; a checkpoint is kept."""


class EngineError(UserError, RuntimeError):
    """vLLM could not start or serve, or a private part of vLLM or torch that grpoflow reaches into
    (grpoflow/private_api.py) is not where the versions it was checked with keep it. The message names
    the config key, or the version, to change."""


class RolloutServerError(EngineError):
    """The rollout server (rollout.placement server, grpoflow/rollout/server.py) closed the connection,
    did not answer in time, or refused a request. The message names the address and the knob; the
    trainer writes a checkpoint and stops, and the same command resumes once a server answers."""
