"""cache.rm: delete a text cache and all its binary caches."""

from __future__ import annotations

from typing import Any

from ..caches.names import check_name
from ..protocol import ErrorCode, WireError
from .validate import get

OP = "cache.rm"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    name = check_name(get(request, "name", str))
    try:
        existed = daemon.caches.texts.remove(name)
    except OSError as exc:
        raise WireError(ErrorCode.STORAGE, f"cannot remove text cache {name}: {exc.strerror}", errno=exc.errno) from None
    daemon.caches.forget(name)
    if not existed:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return {"name": name, "removed": True}
