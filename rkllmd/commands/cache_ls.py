"""cache.ls: every text cache with the state of its binary cache."""

from __future__ import annotations

from typing import Any

OP = "cache.ls"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    return {"caches": daemon.caches.listing(), "memory": daemon.caches.memory()}
