"""copy: a model under a second name (Ollama's cp): a derived model of the same base with
the same overrides, stored as the created models are."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from .context import Context, Request
from .models import public

OP = "copy"


def execute(ctx: Context, request: Request) -> Future[dict[str, Any]]:
    def change() -> dict[str, Any]:  # on the disk thread: the models file is written and fsynced
        model = ctx.registry.copy(request.args["source"], request.args["destination"])
        return public(ctx, model.name)

    return ctx.disk.submit(change)
