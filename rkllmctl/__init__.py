"""rkllmctl: the client of rkllmd, as a Python library and a shell command."""

from .client import Client, Event, GenerationResult, Piece, Progress, Queued, Started, Stream
from .errors import DaemonError, DaemonUnreachable, GenerationCutShort, PermissionDenied, ProtocolViolation, RkllmError

__all__ = [
    "Client",
    "DaemonError",
    "DaemonUnreachable",
    "Event",
    "GenerationCutShort",
    "GenerationResult",
    "PermissionDenied",
    "Piece",
    "Progress",
    "ProtocolViolation",
    "Queued",
    "RkllmError",
    "Started",
    "Stream",
]
