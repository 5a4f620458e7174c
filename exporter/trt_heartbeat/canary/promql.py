"""PromQL text the project writes: label matchers checked before Prometheus sees them."""

from __future__ import annotations

import re

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# A rough check for `name op "value"` matchers; Prometheus itself has the final word.
MATCHER = re.compile(r'^\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*$')


def split_matchers(inner: str) -> list[str]:
    """`a="x", b=~"y,z"` -> the matchers, commas inside quotes kept."""
    parts, current, quoted, escaped = [], "", False, False
    for ch in inner:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(current)
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current)
    return parts


def bad_matcher(inner: str) -> str | None:
    """The first matcher of `inner` that is not like name="value", if any."""
    return next((m.strip() for m in split_matchers(inner) if not MATCHER.match(m)), None)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
