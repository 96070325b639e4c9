"""Prefect orchestration only: flows wire the stages in stages/, which run without Prefect."""

import logging
import os

# Offline by default: no telemetry, and room for a cold ephemeral-server start on a small
# machine (16 s measured here; the 20 s default was once exceeded under load).
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "grpoflow",
}.items():
    os.environ.setdefault(_key, _value)

# The stages log through "grpoflow.*"; Prefect forwards those records to the run's logs (the
# extra-loggers setting above), but only the ones the logger lets through.
logging.getLogger("grpoflow").setLevel(logging.INFO)
