"""status: what the daemon runs and how it is doing."""

from __future__ import annotations

from typing import Any

OP = "status"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    return daemon.status()
