"""cache.ls: every text cache with the state of its binary cache."""

from __future__ import annotations

from concurrent.futures import Future
from .context import Context, Request

OP = "cache.ls"


def execute(ctx: Context, request: Request) -> Future:
    model = ctx.loaded_model(request)  # binary caches are per model; text caches are shared by name
    return ctx.disk.submit(lambda: {"caches": model.caches.listing(), "memory": model.caches.memory(), "model": request.model.model.name})  # listing reads the folder
