"""ping: the cheapest round trip, for health checks and connection tests."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..schema import PROTOCOL
from .context import Context, Request

OP = "ping"


def execute(ctx: Context, request: Request) -> dict[str, Any]:
    return {"pong": True, "version": __version__, "protocol": list(PROTOCOL)}
