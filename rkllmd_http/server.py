"""The HTTP application: routes, the error boundary, API keys, CORS, /health and /metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from rkllmctl.aio import AsyncClient
from rkllmd.config import HttpConfig
from rkllmd.service import ServiceNotifier

from . import caches, ollama, openai
from .errors import ApiError, api_error
from .gateway import Gateway
from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("rkllmd_http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Paths served without an API key: probes must not need the secret.
OPEN_PATHS = frozenset({"/", "/health"})
#: What ``GET /`` answers, as Ollama does: clients and Open WebUI probe a server with it.
ROOT_TEXT = "Ollama is running"
#: How long /health and /metrics wait for the daemon.
PROBE_TIMEOUT_S = 2.0
#: How long a stop lets running requests finish before cancelling them (and their generations).
SHUTDOWN_GRACE_S = 5.0
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


class KeyFileError(Exception):
    """The API key file cannot be used (missing, unreadable, or without a key)."""


def read_keys(path: str) -> tuple[bytes, ...]:
    """Accepted keys: one a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"api key file {path}: {exc}") from None
    keys = tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise KeyFileError(f"api key file {path} holds no key")
    return keys


def _ollama_route(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def render(request: web.Request, error: ApiError) -> web.Response:
    if _ollama_route(request):
        return web.json_response(error.ollama(), status=error.ollama_status(), headers=error.headers)
    return web.json_response(error.openai(), status=error.status, headers=error.headers)


def _client_left(request: web.Request) -> bool:
    """Whether the request's connection is gone (else a cancellation is the gateway's stop)."""
    return request.transport is None or request.transport.is_closing()


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def http_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals, saying what was asked: a path it does not serve (naming those
    it does), a method a path does not take, a body over the limit."""
    if request.match_info.route.resource is None and exc.status == 404:
        served = sorted({r.canonical for r in request.app.router.resources()})
        return ApiError(404, f"rkllmd-http does not serve {request.path} (it serves {', '.join(served)}; docs/http.md)", code="not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(405, f"{request.method} is not served on {request.path}: it takes {allowed}", code="method_not_allowed",
                        headers={"Allow": allowed})
    return ApiError(exc.status, exc.reason if exc.status != 413 else exc.text or exc.reason, code=exc.reason.lower().replace(" ", "_"))


def make_app(client: AsyncClient, config: HttpConfig, keys: tuple[bytes, ...] = ()) -> web.Application:
    metrics = Metrics()
    origins = frozenset(o.strip() for o in config.cors_origins.split(",") if o.strip())

    @web.middleware
    async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure becomes the caller's dialect of error; every answer is counted.

        A client that leaves before its answer ends is no failure, whichever sees it first:
        aiohttp, which cancels the handler, or a write of the answer, which finds the
        connection closing (aiohttp's ClientConnectionResetError, a ConnectionResetError).
        Either way the handler's generation is cancelled (its ``async with`` is left), the
        request is counted as cancelled, and nothing more is sent."""
        status = "cancelled"
        try:
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                if _client_left(request):
                    log.info("%s %s: the client left before its answer ended", request.method, request.path)
                raise
            except ConnectionResetError as exc:
                log.info("%s %s: the client left before its answer ended (%s)", request.method, request.path, exc)
                raise asyncio.CancelledError from None  # as if aiohttp had seen it first
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = render(request, http_error(request, exc))
            except Exception as exc:
                error = api_error(exc)
                if error is None:
                    log.exception("%s %s failed", request.method, request.path)
                    error = ApiError(500, f"internal error in rkllmd-http: {exc.__class__.__name__}", "server_error", "internal_error")
                response = render(request, error)
            status = str(response.status)
            return response
        finally:
            metrics.requests.labels(_route(request), status).inc()

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys and request.path not in OPEN_PATHS and request.method != "OPTIONS":
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # Every key compared, in constant time: neither timing nor count tells which matched.
            matched = [hmac.compare_digest(given.strip().encode(), key) for key in keys]
            if scheme.lower() != "bearer" or not any(matched):
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key",
                               headers={"WWW-Authenticate": 'Bearer realm="rkllmd"'})
        return await handler(request)

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and _allowed(request) and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600",
            })
        return await handler(request)

    def _allowed(request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        return origin is not None and ("*" in origins or origin in origins)

    async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        if _allowed(request):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else request.headers["Origin"]
            response.headers["Vary"] = "Origin"

    async def root(request: web.Request) -> web.Response:
        return web.Response(text=ROOT_TEXT)

    async def health(request: web.Request) -> web.Response:
        try:
            pong = await asyncio.wait_for(client.ping(), PROBE_TIMEOUT_S)
        except (asyncio.TimeoutError, Exception) as exc:
            error = api_error(exc) if not isinstance(exc, asyncio.TimeoutError) else None
            reason = error.message if error else f"no answer within {PROBE_TIMEOUT_S:g} s"
            return web.json_response({"status": "unavailable", "error": reason}, status=503)
        return web.json_response({"status": "ok", "daemon": {"version": pong["version"], "protocol": pong["protocol"]}})

    async def scrape(request: web.Request) -> web.Response:
        try:
            status = await asyncio.wait_for(client.status(), PROBE_TIMEOUT_S)
        except Exception:  # the scrape still answers: rkllmd_up says the daemon did not
            metrics.daemon_up.set(0)
        else:
            metrics.daemon_up.set(1)
            metrics.queue_depth.set(status["worker"]["queued"])
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    middlewares = [boundary, preflight, authorize] if origins else [boundary, authorize]
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app["gateway"] = Gateway(client, metrics)
    if origins:
        app.on_response_prepare.append(cors_headers)
    app.add_routes([web.get("/", root), web.get("/health", health), web.get("/metrics", scrape), *openai.routes(), *ollama.routes(), *caches.routes()])
    return app


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as (host, port); ValueError if it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def serve(config: HttpConfig, socket_path: str, keys: tuple[bytes, ...]) -> None:
    """Serve until SIGTERM or SIGINT; tell systemd when ready and when stopping."""
    host, port = split_listen(config.listen)
    client = AsyncClient(socket_path or None, timeout=30.0)
    runner = web.AppRunner(make_app(client, config, keys), handler_cancellation=True, access_log_format=ACCESS_LOG_FORMAT,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = ", ".join(f"http://{h if ':' not in h else f'[{h}]'}:{p}" for h, p, *_ in runner.addresses)
    log.info("listening on %s; daemon socket %s%s", bound, client.path, "; API keys required" if keys else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = ServiceNotifier()
    notifier.ready(f"serving on {bound}")
    await stop.wait()
    notifier.notify("STOPPING=1")
    log.info("stopping")
    await runner.cleanup()
    await client.close()
