"""Cache names: the only user-chosen strings that become file names, so checked everywhere."""

from __future__ import annotations

import re

from ..protocol import ErrorCode, WireError

MAX_NAME_CHARS = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
TEXT_SUFFIX = ".txt"


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid cache name, else raise WireError(INVALID_NAME).

    Letters, digits, ``-``, ``_`` and ``.`` (not first, never ``..``), 1 to 64
    characters: nothing that can name another folder or hide as a dot file.
    """
    if not isinstance(name, str):
        raise WireError(ErrorCode.INVALID_NAME, "a cache name must be a string")
    if not name:
        raise WireError(ErrorCode.INVALID_NAME, "a cache name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise WireError(ErrorCode.INVALID_NAME, f"cache name is {len(name)} characters; at most {MAX_NAME_CHARS}")
    if not _NAME.fullmatch(name) or ".." in name:
        raise WireError(
            ErrorCode.INVALID_NAME,
            f"invalid cache name {name!r}: use letters, digits, '-', '_' and '.' (not first, no '..')",
        )
    return name


def name_of_text_file(filename: str) -> str | None:
    """The cache name a file in the text folder stands for, or None (swap, backup, temp files)."""
    if not filename.endswith(TEXT_SUFFIX):
        return None
    try:
        return check_name(filename[: -len(TEXT_SUFFIX)])
    except WireError:
        return None
