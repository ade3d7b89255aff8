"""cache.ls: every text cache with the state of its binary cache."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ..models.pool import LoadedModel
from .context import Context, Request

OP = "cache.ls"


def execute(ctx: Context, request: Request) -> Future:
    model = ctx.loaded_model(request)  # binary caches are per model; text caches are shared by name
    return ctx.disk.submit(lambda: ctx.on_serving(model, lambda serving: _listing(serving, request.model.model.name)))  # listing reads the folder


def _listing(model: LoadedModel, name: str) -> dict[str, Any]:
    return {"caches": model.caches.listing(), "memory": model.caches.memory(), "model": name}
