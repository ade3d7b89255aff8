"""cache.show: one text cache, its text and its binary state."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ..caches.text import TextCacheError
from ..caches.manager import PromptCaches
from ..protocol import ErrorCode, WireError
from .context import Context, Request

OP = "cache.show"


def execute(ctx: Context, request: Request) -> Future:
    model = ctx.loaded_model(request)
    return ctx.disk.submit(lambda: ctx.on_serving(model, lambda serving: _show(serving.caches, request.args["name"])))


def _show(caches: PromptCaches, name: str) -> dict[str, Any]:
    path = str(caches.texts.path(name))
    try:
        text = caches.texts.read(name)
    except TextCacheError as exc:
        entry = caches.refresh(name)
        return {**entry.public(), "text": None, "sha256": None, "path": path, "error": str(exc)}
    if text is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    entry = caches.refresh(name)
    return {**entry.public(), "text": text.text, "sha256": text.sha256, "path": path, "error": None}
