"""cache.wait: answer once the binary cache matches the current text (or cannot)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..caches.manager import PromptCaches
from ..protocol import ErrorCode, WireError

if TYPE_CHECKING:
    from .context import Context, Deferred, Request

OP = "cache.wait"


def execute(ctx: Context, request: Request) -> Deferred:
    from .context import Deferred

    name = request.args["name"]
    answer = Deferred(time.monotonic() + request.args["timeout"], lambda: ctx.waiters.outcome(name) or _not_ready(name))

    def refresh_then_wait() -> None:
        ctx.caches.refresh(name)  # an edit the watcher has not reported yet counts too
        ctx.waiters.add(name, answer)

    ctx.disk.submit(refresh_then_wait).add_done_callback(lambda done: _fail_with(done, answer))
    return answer


def _not_ready(name: str) -> WireError:
    return WireError(ErrorCode.TIMEOUT, f"cache {name} is not ready yet")


def _fail_with(done: Future, answer: Deferred) -> None:
    """The refresh failed: that is the answer (a cancelled one is answered at shutdown)."""
    if not done.cancelled() and done.exception() is not None:
        answer.resolve(done.exception())


class CacheWaiters:
    """Answers waiting for caches to settle; told of every change by the cache manager
    (from whichever thread made it)."""

    def __init__(self, caches: PromptCaches):
        self.caches = caches
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Deferred]] = {}

    def add(self, name: str, answer: Deferred) -> None:
        with self._lock:
            self._waiting.setdefault(name, []).append(answer)
        self.changed(name)

    def outcome(self, name: str) -> dict[str, Any] | WireError | None:
        """The answer for ``name`` now: its entry, or why it cannot settle; None while it is
        still to be built. Reads nothing from disk."""
        done, error = self.caches.settled(name)
        if not done:
            return None
        entry = self.caches.entry(name) if error is None else None
        if entry is None:
            code = ErrorCode.NOT_FOUND if error in (None, "no such text cache") else ErrorCode.CACHE_BUILD_FAILED
            return WireError(code, f"cache {name}: {error or 'no such text cache'}")
        return entry.public()

    def changed(self, name: str) -> None:
        """``name`` changed state: answer whoever waits for it, if it has settled."""
        with self._lock:
            waiting = [a for a in self._waiting.pop(name, []) if not a.done()]
        if not waiting:
            return
        outcome = self.outcome(name)
        if outcome is None:
            with self._lock:
                self._waiting.setdefault(name, []).extend(waiting)
            return
        for answer in waiting:
            answer.resolve(outcome)
