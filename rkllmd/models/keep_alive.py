"""Ollama's ``keep_alive``: how long a model stays loaded once idle.

A number is seconds; a string is a Go duration ("5m", "1h30m", "250ms", "-1s") or a
bare number; 0 unloads the model as soon as it is idle, a negative value keeps it until
the daemon stops (None here).
"""

from __future__ import annotations

import math
import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class KeepAliveError(ValueError):
    """Not a duration; the message says what was given."""


def seconds(value: object) -> float | None:
    """``value`` in seconds, None for "forever" (negative)."""
    if isinstance(value, bool) or value is None:
        raise KeepAliveError(f"keep_alive must be a duration or a number of seconds, not {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = _duration(value.strip())
    else:
        raise KeepAliveError(f"keep_alive must be a duration or a number of seconds, not {value!r}")
    if not math.isfinite(number):
        raise KeepAliveError(f"keep_alive must be finite, not {value!r}")
    return None if number < 0 else number


def _duration(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, at = 0.0, 0
    for match in _PART.finditer(body):
        if match.start() != at:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        at = match.end()
    if not body or at != len(body):
        raise KeepAliveError(f"keep_alive {text!r} is not a duration (like 5m, 1h30m, 0 or -1)")
    return sign * total
