"""cancel: stop one of this client's generations, queued or running."""

from __future__ import annotations

from typing import Any

from ..protocol import ErrorCode, WireError

OP = "cancel"


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> dict[str, Any]:
    target = request.get("target")
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise WireError(ErrorCode.INVALID_FIELD, "field 'target' must be the id of a generate request", field="target")
    gen = daemon.generations.get((identity, target))
    state = None if gen is None else daemon.worker.cancel(gen)
    if state is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no queued or running request {target!r} from this client")
    return {"target": target, "was": state}
