"""cache.show: one text cache, its text and its binary state."""

from __future__ import annotations

from typing import Any

from ..caches.names import check_name
from ..caches.text import TextCacheError
from ..protocol import ErrorCode, WireError
from .validate import get

OP = "cache.show"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    name = check_name(get(request, "name", str))
    try:
        text = daemon.caches.texts.read(name)
    except TextCacheError as exc:
        entry = daemon.caches.refresh(name)
        return {**entry.public(), "text": None, "path": str(daemon.caches.texts.path(name)), "error": str(exc)}
    if text is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    entry = daemon.caches.refresh(name)
    return {**entry.public(), "text": text.text, "sha256": text.sha256, "path": str(daemon.caches.texts.path(name))}
