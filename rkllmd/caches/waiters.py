"""Answers waiting for a cache to settle (cache.wait), per model's prompt caches."""

from __future__ import annotations

import threading
from typing import Any

from ..deferred import Deferred
from ..protocol import ErrorCode, WireError
from .manager import PromptCaches


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
