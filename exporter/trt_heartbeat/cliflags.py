"""What every command module shares at the edge: the bad-input exception and flag parsing."""

from __future__ import annotations

import math
import time
from datetime import datetime

import click

from trt_heartbeat import documents

ENV_PREFIX = "TRT_HEARTBEAT"


class BadInput(click.ClickException):
    """Invalid configuration or flag values: exit code 2, one line, no traceback."""

    exit_code = 2


def env_name(flag: str) -> str:
    return ENV_PREFIX + "_" + flag.lstrip("-").replace(".", "_").replace("-", "_").upper()


def duration_flag(flag: str, value: str) -> float:
    try:
        seconds = documents.parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise BadInput(f"{flag}: expected a duration like 30s, 5m or 1h, got {value!r}")
    return seconds


def time_flag(value: str | None) -> float:
    if value is None:
        return time.time()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds > 0:
            return seconds
        raise BadInput(f"--at: expected a positive Unix time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(
            f"--at: expected RFC 3339 (2026-11-22T10:00:00Z) or Unix seconds, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        raise BadInput(f"--at: {value!r} has no time zone (add Z for UTC)")
    return parsed.timestamp()
