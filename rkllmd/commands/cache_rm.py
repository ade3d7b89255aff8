"""cache.rm: delete a text cache and all its binary caches."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ..protocol import ErrorCode, WireError
from .context import Context, Request

OP = "cache.rm"


def execute(ctx: Context, request: Request) -> Future:
    return ctx.disk.submit(_remove, ctx, request.args["name"])


def _remove(ctx: Context, name: str) -> dict[str, Any]:
    try:
        existed = ctx.caches.texts.remove(name)
    except OSError as exc:
        raise WireError(ErrorCode.STORAGE, f"cannot remove text cache {name}: {exc.strerror}", errno=exc.errno) from None
    for model in ctx.pool.loaded():  # the text is every model's; so were its binary caches
        model.caches.forget(name)
    if not existed:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return {"name": name, "removed": True}
