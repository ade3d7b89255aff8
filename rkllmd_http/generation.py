"""What both APIs share: checking sampling values, starting a generation, following it.

A Generation waits for the daemon's first piece (or its end) before the handler sends
any header, so that a refusal (queue full, context overflow, a bad field) still gets its
HTTP status; after that, errors travel inside the stream. Leaving it early (the HTTP
client went away and aiohttp cancelled the handler) cancels the daemon's generation.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from rkllmctl.aio import AsyncClient, AsyncStream
from rkllmctl.client import GenerationResult, Piece
from rkllmctl.errors import DaemonError
from aiohttp import web

from rkllmd.schema import MAX_ON_BEHALF_CHARS, OPERATIONS

from .errors import api_error, invalid
from .metrics import Metrics

GENERATE = OPERATIONS["generate"]
#: Fields of generate this checkout's protocol has (tools, vars... arrive with protocol 1.2).
SUPPORTED = frozenset(f.name for f in GENERATE.fields)


def on_behalf_of(request: web.Request, body: dict[str, Any]) -> str:
    """Whom a request is for, so that the daemon's turns go per person, not to the gateway as
    one client: OpenAI's ``user``, Open WebUI's forwarded user id (its
    ENABLE_FORWARD_USER_INFO_HEADERS), else the peer's address."""
    user = body.get("user")
    if isinstance(user, str) and user.strip():
        who = f"user {user.strip()}"
    elif request.headers.get("X-OpenWebUI-User-Id", "").strip():
        who = f"user {request.headers['X-OpenWebUI-User-Id'].strip()}"
    else:
        who = f"http {request.remote or 'unknown'}"
    return who[:MAX_ON_BEHALF_CHARS]


def require(field: str, what: str) -> None:
    """Refuse a feature the daemon's protocol does not have yet, clearly."""
    if field not in SUPPORTED:
        raise invalid(f"{what} is not supported by this rkllmd (its protocol has no {field!r} field yet)", field, "unsupported_parameter")


def number(body: dict[str, Any], key: str, kind: type, param: str | None = None) -> Any:
    """``body[key]`` if present and not null, checked to be a number of ``kind`` (ranges: the daemon's)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and not isinstance(value, int) and not float(value).is_integer():
        raise invalid(f"{param or key!r} must be {'an integer' if kind is int else 'a number'}", param or key)
    return kind(value)


def stops(value: Any, param: str) -> list[str] | None:
    """OpenAI and Ollama give ``stop`` as a string or a list of strings."""
    if value is None or value == []:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise invalid(f"{param!r} must be a string or an array of strings", param)


def text_content(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's array of parts of which only text is served."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}: only text content is supported (got a {kind!r} part)", where)
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where} must be a string or an array of text parts", where)


class Generation:
    """``async with Generation(client, metrics, "openai", fields) as g: async for piece in g``.

    ``params`` maps a daemon field to the API's name for it, for a refusal's ``param``."""

    def __init__(self, client: AsyncClient, metrics: Metrics, api: str, fields: dict[str, Any], params: dict[str, str] | None = None):
        self.client = client
        self.metrics = metrics
        self.api = api
        self.fields = fields
        self.params = params or {}
        self.received = time.monotonic()
        self.ttft_s: float | None = None
        self._stream: AsyncStream | None = None
        self._first: Piece | None = None

    async def __aenter__(self) -> Generation:
        self._stream = self.client.generate(**self.fields)
        self.metrics.in_flight.inc()
        try:
            self._pieces = aiter(self._stream)
            self._first = await anext(self._pieces, None)
        except DaemonError as exc:
            await self.__aexit__()
            field = (exc.details or {}).get("field")
            if field not in self.params:
                raise
            error = api_error(exc)
            assert error is not None
            error.param = self.params[field]
            raise error from None
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        await stream.__aexit__()
        self.metrics.in_flight.dec()
        if stream.result is not None:
            self.metrics.generation_ended(self.api, stream.result, self.ttft_s)

    @property
    def result(self) -> GenerationResult:
        assert self._stream is not None and self._stream.result is not None
        return self._stream.result

    async def __aiter__(self) -> AsyncIterator[Piece]:
        if self._first is not None:
            first, self._first = self._first, None
            self._seen()
            yield first
        async for piece in self._pieces:
            self._seen()
            yield piece

    def _seen(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.received
