"""Answers gathered off the socket loop: ``status`` and ``models`` ask each runner (a
bounded wait each), and a runner that does not answer must not hold up other clients.

Requests of one kind that arrive while one answer is being gathered share the next one:
a flood of status requests costs at most two gatherings at a time, and its replies share
one result, instead of one report, and its memory, per request.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Inquiries:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inquiries")
        self._lock = threading.Lock()
        self._next: dict[str, Future] = {}  # by kind: the answer that requests arriving now get

    def ask(self, kind: str, gather: Callable[[], dict[str, Any]]) -> Future:
        """The next answer of ``kind`` (gathered by ``gather`` after this call)."""
        with self._lock:
            answer = self._next.get(kind)
            if answer is None:
                answer = self._next[kind] = Future()
                self._executor.submit(self._gather, kind, answer, gather)
            return answer

    def _gather(self, kind: str, answer: Future, gather: Callable[[], dict[str, Any]]) -> None:
        with self._lock:
            if self._next.get(kind) is answer:
                del self._next[kind]  # requests arriving from now on get a later answer
        try:
            answer.set_result(gather())
        except BaseException as exc:
            answer.set_exception(exc)

    def shutdown(self) -> None:
        """Answers not gathered yet are cancelled (their requests hear "shutting down")."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            pending, self._next = list(self._next.values()), {}
        for answer in pending:
            answer.cancel()
