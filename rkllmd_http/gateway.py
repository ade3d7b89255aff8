"""The gateway's shared state: its daemon connection, metrics, and what it says of the model."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from rkllmctl.aio import AsyncClient
from rkllmd import __version__

from .errors import ApiError, invalid
from .metrics import Metrics


@dataclass(frozen=True)
class ModelInfo:
    """The daemon's model as both APIs name and describe it."""

    id: str  # OpenAI's model id, e.g. smollm2-135m-instruct
    created: int  # when the daemon loaded it (Unix time)
    describe: dict[str, Any]  # status.model, as the daemon's backend describes it

    @property
    def ollama_name(self) -> str:
        return f"{self.id}:latest"


def model_id(name: str) -> str:
    return "-".join(name.lower().split()) or "rkllmd"


class Gateway:
    """What every handler reaches through ``request.app["gateway"]``."""

    def __init__(self, client: AsyncClient, metrics: Metrics):
        self.client = client
        self.metrics = metrics
        self.fingerprint = f"rkllmd-{__version__}"

    async def model(self) -> ModelInfo:
        status = await self.client.status()
        describe = status["model"] or {}
        name = describe.get("name") or describe.get("path", "").rsplit("/", 1)[-1]
        return ModelInfo(model_id(name), int(time.time() - status["uptime_s"]), describe)

    async def json_body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object (aiohttp refuses bodies over the limit with 413)."""
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        return body
