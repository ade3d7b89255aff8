"""Prompt caches over HTTP, for apps that speak only HTTP: /v1/cache/{model} (list),
/v1/cache/{model}/{name} (GET show, PUT text, DELETE), POST .../rebuild. Behind the
gateway's API keys like every route; errors in OpenAI's shape.

The text caches are shared by every model (a PUT queues the build for each loaded one);
the binary caches, their states and builds, are the named model's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from rkllmctl.errors import DaemonError

from .errors import api_error, invalid
from .gateway import Gateway


async def _call(request: web.Request, op: str, **fields: Any) -> dict[str, Any]:
    gateway: Gateway = request.app["gateway"]
    try:
        return await gateway.client.call(op, **fields)
    except DaemonError as exc:
        raise api_error(exc) from None  # type: ignore[misc]


async def listing(request: web.Request) -> web.Response:
    return web.json_response(await _call(request, "cache.ls", model=request.match_info["model"]))


async def show(request: web.Request) -> web.Response:
    return web.json_response(await _call(request, "cache.show", name=request.match_info["name"], model=request.match_info["model"]))


async def put(request: web.Request) -> web.Response:
    """The text as JSON ``{"text": ...}``, or the body itself when it is text/plain."""
    if request.content_type == "text/plain":
        try:
            text = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("the text must be UTF-8", "text") from None
    else:
        body = await request.app["gateway"].json_body(request)
        text = body.get("text")
        if not isinstance(text, str):
            raise invalid("'text' must be a string", "text")
    return web.json_response(await _call(request, "cache.put", name=request.match_info["name"], text=text, model=request.match_info["model"]))


async def delete(request: web.Request) -> web.Response:
    return web.json_response(await _call(request, "cache.rm", name=request.match_info["name"]))


async def rebuild(request: web.Request) -> web.Response:
    return web.json_response(await _call(request, "cache.rebuild", name=request.match_info.get("name"), model=request.match_info["model"]))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/cache/{model}", listing),
        web.post("/v1/cache/{model}/rebuild", rebuild),
        web.get("/v1/cache/{model}/{name}", show),
        web.put("/v1/cache/{model}/{name}", put),
        web.delete("/v1/cache/{model}/{name}", delete),
        web.post("/v1/cache/{model}/{name}/rebuild", rebuild),
    ]
