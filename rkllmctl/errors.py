"""What can go wrong talking to rkllmd, as exception types (the CLI maps them to exit codes)."""

from __future__ import annotations

from typing import Any


class RkllmError(Exception):
    """Base of every rkllmctl error."""


class DaemonUnreachable(RkllmError):
    """No daemon answers at the socket; the message says what to do."""


class PermissionDenied(DaemonUnreachable):
    """The socket exists but this user may not connect to it."""


class ProtocolViolation(RkllmError):
    """The daemon sent something the protocol does not allow (a bug on one side)."""


class DaemonError(RkllmError):
    """The daemon answered with an error: ``code`` and ``name`` from docs/protocol.md."""

    def __init__(self, code: int, name: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.name}, {self.code})"
