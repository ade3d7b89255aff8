"""cache.wait: answer once the binary cache matches the current text (or cannot)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..caches.names import check_name
from .validate import get

OP = "cache.wait"
MAX_WAIT_S = 3600.0


@dataclass(eq=False)
class CacheWaiter:
    identity: bytes
    request_id: Any
    name: str
    deadline: float


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> None:
    name = check_name(get(request, "name", str))
    timeout = get(request, "timeout", float, 60.0, low=0.0, high=MAX_WAIT_S)
    daemon.caches.refresh(name)  # an edit the watcher has not reported yet counts too
    waiter = CacheWaiter(identity, request["id"], name, time.monotonic() + timeout)
    if not daemon.answer_waiter(waiter):
        daemon.waiters.append(waiter)
    return None
