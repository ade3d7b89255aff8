"""cache.put: create or replace a text cache; its binary cache is rebuilt by itself."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ..caches.text import TextCacheError
from ..models.pool import LoadedModel
from ..protocol import ErrorCode, WireError
from .context import Context, Request

OP = "cache.put"


def execute(ctx: Context, request: Request) -> Future:
    model, name, text = ctx.loaded_model(request), request.args["name"], request.args["text"]
    return ctx.disk.submit(ctx.on_serving, model, lambda serving: _put(ctx, serving, name, text))


def _put(ctx: Context, model: LoadedModel, name: str, text: str) -> dict[str, Any]:
    """Write the text (shared by every model), queue its build for every loaded model; the
    entry of ``model`` (the one serving the request's model name now)."""
    try:
        model.caches.texts.write(name, text)
    except TextCacheError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, f"text cache {name}: {exc}", field="text") from None
    except OSError as exc:
        raise WireError(ErrorCode.STORAGE, f"cannot write text cache {name}: {exc.strerror}", errno=exc.errno) from None
    entry = model.caches.refresh(name)
    for other in ctx.pool.loaded():
        if other is not model:
            other.caches.refresh(name)
    return entry.public()
