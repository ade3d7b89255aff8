"""cache.put: create or replace a text cache; its binary cache is rebuilt by itself."""

from __future__ import annotations

from typing import Any

from ..caches.names import check_name
from ..caches.text import TextCacheError
from ..protocol import ErrorCode, WireError
from .validate import get

OP = "cache.put"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    name = check_name(get(request, "name", str))
    text = get(request, "text", str)
    try:
        daemon.caches.texts.write(name, text)
    except TextCacheError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, f"text cache {name}: {exc}", field="text") from None
    except OSError as exc:
        raise WireError(ErrorCode.STORAGE, f"cannot write text cache {name}: {exc.strerror}", errno=exc.errno) from None
    entry = daemon.caches.refresh(name)
    return entry.public()
