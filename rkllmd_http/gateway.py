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
    """One of the daemon's models as both APIs name and describe it."""

    id: str  # the daemon's name for it, OpenAI's model id (smollm2-135m-instruct)
    created: int  # when it was created, else when the daemon started (Unix time)
    #: What the backend says of its weights (status.model for the default model's; the
    #: loaded model's otherwise; only the file's path while its weights are not loaded).
    describe: dict[str, Any]
    entry: dict[str, Any]  # the daemon's ``models`` entry
    loaded: dict[str, Any] | None  # its weights as loaded (size, expires_at), or None

    @property
    def ollama_name(self) -> str:
        return self.id if ":" in self.id else f"{self.id}:latest"


class Gateway:
    """What every handler reaches through ``request.app["gateway"]``."""

    def __init__(self, client: AsyncClient, metrics: Metrics):
        self.client = client
        self.metrics = metrics
        self.fingerprint = f"rkllmd-{__version__}"

    async def models(self) -> list[ModelInfo]:
        """Every model the daemon serves, the default first."""
        status = await self.client.status()
        listing = await self.client.call("models")
        started = int(time.time() - status["uptime_s"])
        loaded = {m["name"]: m for m in listing["loaded"]}
        default_weights = next(m["weights"] for m in listing["models"] if m["default"])
        infos = []
        for entry in listing["models"]:
            weights = loaded.get(entry["weights"])
            if entry["weights"] == default_weights:
                describe = {**(status["model"] or {})}
            elif weights is not None:
                describe = {**weights.get("describe", {})}
            else:
                root = next(m for m in listing["models"] if m["name"] == entry["weights"])
                describe = {"path": root["path"], "backend": "rkllm" if root["path"].endswith(".rkllm") else "cpu"}
            infos.append(ModelInfo(entry["name"], int(entry["created_at"]) or started, describe, entry, weights))
        return sorted(infos, key=lambda info: not info.entry["default"])

    async def model(self, name: Any = None) -> ModelInfo:
        """The model ``name`` names (None: the default), or ApiError 404 as each API says it."""
        infos = await self.models()
        if name is None or name == "":
            return infos[0]
        if isinstance(name, str):
            key = name.removesuffix(":latest")
            for info in infos:
                if info.id == key:
                    return info
        raise ApiError(404, f"model {name!r} not found", code="model_not_found", param="model")

    async def json_body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object (aiohttp refuses bodies over the limit with 413)."""
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        return body
