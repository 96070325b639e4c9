"""Secrets the stages need, read from Prefect blocks inside the task that uses them: never a flow or task
parameter, so a secret is never recorded with a run's inputs or hashed into a cache key."""

from __future__ import annotations

from grpoflow.config import ConfigError, PipelineConfig


def hub_token(cfg: PipelineConfig) -> str | None:
    """The token from the Prefect Secret block export.hub_token_secret names; None: HF_TOKEN."""
    if not (cfg.export.push_to_hub and cfg.export.hub_token_secret):
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(cfg.export.hub_token_secret).get()
    except ValueError as e:
        raise ConfigError(f"export.hub_token_secret: no Prefect Secret block named {cfg.export.hub_token_secret!r} "
                          f"({e}); create one in the UI (Blocks > Secret) or with "
                          f"Secret(value=...).save({cfg.export.hub_token_secret!r})") from None
