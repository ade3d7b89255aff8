"""cache.rebuild: build binary caches again even if they look current (one name or all)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ..caches.manager import PromptCaches
from ..protocol import ErrorCode, WireError
from .context import Context, Request

OP = "cache.rebuild"


def execute(ctx: Context, request: Request) -> Future:
    model = ctx.loaded_model(request)
    return ctx.disk.submit(lambda: ctx.on_serving(model, lambda serving: _rebuild(serving.caches, request.args["name"])))


def _rebuild(caches: PromptCaches, name: str | None) -> dict[str, Any]:
    names = [name] if name is not None else caches.texts.names()
    queued = [each for each in names if caches.refresh(each, force=True) is not None]
    if name is not None and not queued:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return {"queued": queued}
