"""ping: the cheapest round trip, for health checks and connection tests."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..protocol import PROTOCOL_VERSION

OP = "ping"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "version": __version__, "protocol": PROTOCOL_VERSION}
