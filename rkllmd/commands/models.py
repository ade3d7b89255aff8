"""models: every model by name (the configuration's and the created ones), and which are loaded."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from .context import Context, Request

OP = "models"


def execute(ctx: Context, request: Request) -> Future:
    return ctx.inquiries.ask(OP, lambda: listing(ctx))  # each loaded model's facts come from its runner: never on the socket loop


def listing(ctx: Context) -> dict[str, Any]:
    loaded = loaded_models(ctx)
    return {
        "models": [{**entry, "loaded": entry["weights"] in loaded} for entry in ctx.registry.listing()],
        "default": ctx.registry.default,
        "loaded": list(loaded.values()),
    }


def loaded_models(ctx: Context) -> dict[str, dict[str, Any]]:
    """The loaded weights by model name, with their size and when they expire (Unix time; None: never)."""
    now_wall, now = time.time(), time.monotonic()
    return {model.name: model.public(now_wall, now) for model in ctx.pool.loaded()}


def public(ctx: Context, name: str) -> dict[str, Any]:
    """One model as ``models`` lists it."""
    entry = next(e for e in ctx.registry.listing() if e["name"] == name)
    return {**entry, "loaded": entry["weights"] in loaded_models(ctx)}
