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
        self._successor: CacheWaiters | None = None  # the waiters of the model a reload put in its place

    def hand_over(self, successor: CacheWaiters) -> None:
        """A reload replaced the model: whoever waits here, or comes to wait later, waits for
        the new model's caches (``successor``) instead; the old one's builds are abandoned."""
        with self._lock:
            self._successor = successor
            waiting, self._waiting = self._waiting, {}
        for name, answers in waiting.items():
            for answer in answers:
                successor.add(name, answer)

    def add(self, name: str, answer: Deferred) -> None:
        with self._lock:
            successor = self._successor
            if successor is None:
                self._waiting.setdefault(name, []).append(answer)
        if successor is not None:
            successor.add(name, answer)
            return
        self.changed(name)

    def outcome(self, name: str) -> dict[str, Any] | WireError | None:
        """The answer for ``name`` now: its entry, or why it cannot settle; None while it is
        still to be built. Reads nothing from disk."""
        if self._successor is not None:
            return self._successor.outcome(name)
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
