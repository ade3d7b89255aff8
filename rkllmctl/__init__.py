"""rkllmctl: the client of rkllmd, as a Python library and a shell command.

The library's names are imported on first use (PEP 562), so the shell command, which
imports this package first, loads the socket client (ZeroMQ, msgpack) only when it
talks to the daemon, and ``rkllmctl --help`` starts without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client, Event, GenerationResult, Piece, Progress, Queued, Started, Stream
    from .errors import DaemonError, DaemonUnreachable, GenerationCutShort, PermissionDenied, ProtocolViolation, RkllmError

_FROM = {
    **dict.fromkeys(("Client", "Event", "GenerationResult", "Piece", "Progress", "Queued", "Started", "Stream"), ".client"),
    **dict.fromkeys(("DaemonError", "DaemonUnreachable", "GenerationCutShort", "PermissionDenied", "ProtocolViolation", "RkllmError"), ".errors"),
}
__all__ = sorted(_FROM)


def __getattr__(name: str) -> Any:
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_FROM[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM})
