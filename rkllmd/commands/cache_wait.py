"""cache.wait: answer once the binary cache matches the current text (or cannot)."""

from __future__ import annotations

import time
from concurrent.futures import Future

from ..deferred import Deferred
from ..protocol import ErrorCode, WireError
from ..models.pool import LoadedModel
from .context import Context, Request

OP = "cache.wait"


def execute(ctx: Context, request: Request) -> Deferred:
    name, model = request.args["name"], ctx.loaded_model(request)
    answer = Deferred(time.monotonic() + request.args["timeout"], lambda: model.waiters.outcome(name) or _not_ready(name))

    def refresh_then_wait(serving: LoadedModel) -> None:
        serving.caches.refresh(name)  # an edit the watcher has not reported yet counts too
        serving.waiters.add(name, answer)

    ctx.disk.submit(ctx.on_serving, model, refresh_then_wait).add_done_callback(lambda done: _fail_with(done, answer))
    return answer


def _not_ready(name: str) -> WireError:
    return WireError(ErrorCode.TIMEOUT, f"cache {name} is not ready yet")


def _fail_with(done: Future, answer: Deferred) -> None:
    """The refresh failed: that is the answer (a cancelled one is answered at shutdown)."""
    if not done.cancelled() and done.exception() is not None:
        answer.resolve(done.exception())
