"""rkllmctl: the client of rkllmd, as a Python library and a shell command."""

from .client import Client, GenerationResult, Piece, Stream
from .errors import DaemonError, DaemonUnreachable, PermissionDenied, ProtocolViolation, RkllmError

__all__ = [
    "Client",
    "DaemonError",
    "DaemonUnreachable",
    "GenerationResult",
    "PermissionDenied",
    "Piece",
    "ProtocolViolation",
    "RkllmError",
    "Stream",
]
