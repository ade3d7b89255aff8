"""cache.rebuild: build binary caches again even if they look current (one name or all)."""

from __future__ import annotations

from typing import Any

from ..caches.names import check_name
from ..protocol import ErrorCode, WireError
from .validate import get

OP = "cache.rebuild"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    name = get(request, "name", str, None)
    names = [check_name(name)] if name is not None else daemon.caches.texts.names()
    queued = []
    for each in names:
        if daemon.caches.refresh(each, force=True) is not None:
            queued.append(each)
    if name is not None and not queued:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return {"queued": queued}
