"""cancel: stop one of this client's generations, queued or running."""

from __future__ import annotations

from typing import Any

from ..protocol import ErrorCode, WireError
from .context import Context, Request

OP = "cancel"


def execute(ctx: Context, request: Request) -> dict[str, Any]:
    target = request.args["target"]
    gen = ctx.generations.get((request.identity, target))
    state = None if gen is None else ctx.scheduler.cancel(gen)
    if state is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no queued or running request {target!r} from this client")
    return {"target": target, "was": state}
