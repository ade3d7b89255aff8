"""The wire protocol shared by the daemon and its clients (spec: docs/protocol.md).

This module is deliberately light (msgpack only) so that client code can import it
without pulling in the model stack.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgpack

#: Bumped on any incompatible change; a request carrying another version is refused.
PROTOCOL_VERSION = 1

#: Largest request, in bytes, the daemon reads (larger ones are answered TOO_LARGE).
MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_CHARS = 128
#: msgpack nesting the decoder accepts before calling a message malformed.
MAX_DEPTH = 16


class ErrorCode(IntEnum):
    """Every error the daemon reports, by number. docs/protocol.md has the same table."""

    MALFORMED = 100  # not msgpack, not a map, or wrong frame count
    UNSUPPORTED_VERSION = 101
    UNKNOWN_OP = 102
    INVALID_FIELD = 103  # missing, wrong type or out of range
    TOO_LARGE = 104
    DUPLICATE_ID = 105  # this client already has a live request with that id
    INVALID_NAME = 106  # cache name refused
    QUEUE_FULL = 200
    NOT_FOUND = 201
    SHUTTING_DOWN = 202
    TIMEOUT = 203
    CONTEXT_OVERFLOW = 300
    BACKEND = 301
    CACHE_BUILD_FAILED = 302
    STORAGE = 303  # the daemon's folders refuse a write: read-only, full, permissions
    MODEL_FILE = 304  # a pulled file is not a model this daemon can run, or not the hub's bytes
    HUB = 305  # the Hugging Face hub cannot be reached or refused (authentication, server errors)
    INTERNAL = 399


class WireError(Exception):
    """An error that is answered to the client as ``{"code", "message"}``."""

    def __init__(self, code: ErrorCode, message: str, **details: Any):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": int(self.code), "name": self.code.name.lower(), "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode one message; raise WireError(MALFORMED) on anything that is not msgpack."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"message is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=MAX_MESSAGE_BYTES,
            max_array_len=1 << 16,
            max_map_len=1 << 12,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise WireError(ErrorCode.MALFORMED, f"not a msgpack message: {exc.__class__.__name__}") from None
    if _depth(value) > MAX_DEPTH:
        raise WireError(ErrorCode.MALFORMED, f"message nests deeper than {MAX_DEPTH} levels")
    return value


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, (list, tuple)):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def reply(request_id: Any, type_: str, **fields: Any) -> dict[str, Any]:
    """The envelope every daemon message shares: version, the request's id, a type."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "type": type_, **fields}


def error_reply(request_id: Any, error: WireError) -> dict[str, Any]:
    return reply(request_id, "error", error=error.to_wire())
