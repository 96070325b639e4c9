"""The one timestamp format of what grpoflow writes down (manifests, rounds, drop records, run owners)."""

from __future__ import annotations

import time


def now_iso() -> str:
    """Local time with its UTC offset, to the second: '2026-12-05T07:20:56+0000'."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
