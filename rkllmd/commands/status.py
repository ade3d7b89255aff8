"""status: what the daemon runs and how it is doing (and its one-line form for systemd)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
import os
import time
from typing import Any

from .. import __version__
from ..protocol import MAX_MESSAGE_BYTES
from ..schema import PROTOCOL
from ..templates.capabilities import model_capabilities
from .context import Context, Request
from .models import loaded_models

OP = "status"


def execute(ctx: Context, request: Request) -> Future:
    return ctx.inquiries.ask(OP, lambda: report(ctx))  # it asks the runners: never on the socket loop


def report(ctx: Context) -> dict[str, Any]:
    backend, worker, caches = ctx.worker.backend, ctx.worker, ctx.caches
    activity, requests = worker.activity(), worker.requests()
    return {
        "version": __version__,
        "protocol": list(PROTOCOL),
        "pid": os.getpid(),
        "uptime_s": round(time.time() - ctx.started, 1),
        "socket": str(ctx.socket),
        "backend": backend.kind,
        "backend_reason": ctx.backend_reason,
        "model": {**backend.describe(), "capabilities": list(model_capabilities(backend))},
        "worker": {**activity, "queued": activity["queued"] + ctx.scheduler.waiting(ctx.pool.default_name)},
        "healthy": worker.healthy(within=60.0),
        "counters": {**dataclasses.asdict(ctx.traffic), **_plus(worker.counters.as_dict(), ctx.scheduler.ended(ctx.pool.default_name))},
        "caches": {
            "text_dir": str(caches.texts.folder),
            "binary_dir": str(caches.binaries.folder),
            "states": caches.counts(),
            "builds": caches.builds,
            "memory": caches.memory(),
            "conversations": caches.conversations(),
        },
        "store": ctx.store.report(),
        "requests": {"running": requests["running"], "queued": requests["queued"] + ctx.scheduler.requests()},
        "build": caches.building(),
        "limits": {
            "max_queue": ctx.scheduler.max_queue,
            "max_batch": worker.max_batch,
            "max_tokens": ctx.config.daemon.max_tokens_limit,
            "max_prompt_chars": ctx.config.daemon.max_prompt_chars,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "max_loaded_models": ctx.pool.max_loaded,
            "models_memory_bytes": ctx.pool.memory_budget,
        },
        "models": {"default": ctx.registry.default, "loaded": list(loaded_models(ctx).values()), "loading": ctx.pool.loading(),
                   "waiting": ctx.scheduler.waiting_by_model(), "draining": ctx.pool.drained()},
    }


def _plus(counts: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """The runner's counts with the scheduler's (generations that ended before reaching it)."""
    return {key: value + more.get(key, 0) for key, value in counts.items()}


def line(ctx: Context) -> str:
    """One line for `systemctl status`: what runs, how busy, caches, the last error."""
    worker = ctx.worker
    summary = worker.summary()  # the socket loop asks after every wake: a runner pushes it, never asked
    activity, states = summary["activity"], summary["states"]
    queued = activity["queued"] + ctx.scheduler.waiting(ctx.pool.default_name)
    doing = "generating" if activity["running"] == "generate" else f"building cache {activity['building']}" if activity["building"] else "idle"
    parts = [
        summary["model"],
        f"{doing}, {queued} queued",
        f"caches: {states.get('ready', 0)} ready, {activity['builds_queued'] + (1 if activity['building'] else 0)} building",
        f"{summary['completed']} served",
    ]
    if states.get("failed"):
        parts.append(f"{states['failed']} cache(s) failed")
    if summary["last_error"]:
        parts.append(f"last error: {summary['last_error']}")
    return "; ".join(parts)
