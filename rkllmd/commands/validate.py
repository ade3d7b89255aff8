"""Typed access to request fields: every wrong type or range becomes INVALID_FIELD."""

from __future__ import annotations

from typing import Any

from ..protocol import ErrorCode, WireError

_MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "a map"}


def get(
    request: dict[str, Any],
    key: str,
    kind: type,
    default: Any = _MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    max_len: int | None = None,
) -> Any:
    value = request.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise WireError(ErrorCode.INVALID_FIELD, f"missing field {key!r}", field=key)
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise WireError(ErrorCode.INVALID_FIELD, f"field {key!r} must be {_TYPE_NAMES[kind]}", field=key)
    if kind is float and value != value:
        raise WireError(ErrorCode.INVALID_FIELD, f"field {key!r} must be a number, not NaN", field=key)
    if low is not None and value < low or high is not None and value > high:
        raise WireError(ErrorCode.INVALID_FIELD, f"field {key!r} must be between {low} and {high}", field=key)
    if max_len is not None and len(value) > max_len:
        raise WireError(ErrorCode.TOO_LARGE, f"field {key!r} is longer than {max_len}", field=key)
    return value
