"""delete: remove a created or pulled model (a configured one is removed from the configuration).

A model that others derive from stays until they are deleted. Its weights stay loaded
while another name uses them; a model of its own weights (a pulled file) is unloaded once
idle, and its file is removed when no other name uses it (as ``ollama rm`` removes blobs)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from typing import Any

from .context import Context, Request

OP = "delete"
log = logging.getLogger(__name__)


def execute(ctx: Context, request: Request) -> Future[dict[str, Any]]:
    def change() -> dict[str, Any]:  # on the disk thread: the models file is written and fsynced
        model = ctx.registry.delete(request.args["name"])
        if model.source == "pulled":
            ctx.pool.unload(model.name)
            if not ctx.registry.uses(model.path):
                try:
                    os.unlink(model.path)  # a loaded backend keeps its open file until it is unloaded
                except OSError as exc:
                    log.warning("model %s deleted, but its file %s stays: %s", model.name, model.path, exc.strerror or exc)
        return {**model.public(), "default": False, "weights": model.base or model.name, "loaded": False}

    return ctx.disk.submit(change)
