"""delete: remove a created model (a configured one is removed from the configuration).

A model that others derive from stays until they are deleted. Its weights stay loaded
while another name uses them; a model of its own weights (a pulled file) is unloaded."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from .context import Context, Request

OP = "delete"


def execute(ctx: Context, request: Request) -> Future[dict[str, Any]]:
    def change() -> dict[str, Any]:  # on the disk thread: the models file is written and fsynced
        model = ctx.registry.delete(request.args["name"])
        return {**model.public(), "default": False, "weights": model.base or model.name, "loaded": False}

    return ctx.disk.submit(change)
