"""What every command module shares at the edge: the bad-input exception and flag parsing."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from trt_heartbeat import documents
from trt_heartbeat.errors import HeartbeatError

F = TypeVar("F", bound=Callable[..., Any])

ENV_PREFIX = "TRT_HEARTBEAT"


class BadInput(click.ClickException):
    """Invalid configuration or flag values: exit code 2, one line, no traceback."""

    exit_code = 2


def domain_errors_as_bad_input(func: F) -> F:
    """A command whose domain errors (HeartbeatError) become one clear line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HeartbeatError as exc:
            raise BadInput(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def env_name(flag: str) -> str:
    return ENV_PREFIX + "_" + flag.lstrip("-").replace(".", "_").replace("-", "_").upper()


def duration_flag(flag: str, value: str) -> float:
    try:
        return documents.positive_duration(value)
    except ValueError:
        raise BadInput(f"{flag}: expected a duration like 30s, 5m or 1h, got {value!r}") from None


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
