"""What can go wrong talking to rkllmd, as exception types (the CLI maps them to exit codes).

Each has a ``name`` (the wire error's name for DaemonError), so a script reading
``rkllmctl --json`` output can tell them apart without parsing messages.
"""

from __future__ import annotations

from typing import Any


class RkllmError(Exception):
    """Base of every rkllmctl error."""

    name = "error"
    code: int | None = None  # the wire error's code; None for what never crossed the wire
    details: dict[str, Any] = {}


class DaemonUnreachable(RkllmError):
    """No daemon answers at the socket; the message says what to do."""

    name = "unreachable"


class PermissionDenied(DaemonUnreachable):
    """The socket exists but this user may not connect to it."""

    name = "permission_denied"


class ProtocolViolation(RkllmError):
    """The daemon sent something the protocol does not allow (a bug on one side)."""

    name = "protocol_violation"


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


class GenerationCutShort(RkllmError):
    """The daemon ended a generation this client did not cancel (it is shutting down, or
    found the client too slow to read): what came before is in ``details``."""

    name = "cut_short"

    def __init__(self, reason: str | None, text: str, reasoning: str | None):
        super().__init__(f"the daemon cut the generation short: {reason or 'no reason given'}")
        self.details = {"reason": reason, "text": text, "reasoning": reasoning}
