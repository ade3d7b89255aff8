"""load: load a model now, without a request (Ollama's empty prompt), or with
``keep_alive`` 0 unload it as soon as it is idle."""

from __future__ import annotations

from typing import Any

from .context import Context, Request
from .generate import keep_alive_of

OP = "load"


def execute(ctx: Context, request: Request) -> dict[str, Any]:
    model = request.model
    assert model is not None
    keep = keep_alive_of(request.args)
    if keep == 0:
        return {"model": model.model.name, "loaded": ctx.pool.unload(model.weights.name)}
    ctx.pool.load(model.weights, keep)
    return {"model": model.model.name, "loaded": ctx.pool.get(model.weights.name) is not None}
