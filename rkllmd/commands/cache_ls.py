"""cache.ls: every text cache with the state of its binary cache."""

from __future__ import annotations

from concurrent.futures import Future
from .context import Context, Request

OP = "cache.ls"


def execute(ctx: Context, request: Request) -> Future:
    return ctx.disk.submit(lambda: {"caches": ctx.caches.listing(), "memory": ctx.caches.memory()})  # listing reads the folder
