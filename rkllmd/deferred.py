"""A reply that comes later, with a deadline (cache.wait's answers)."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable

from .protocol import WireError


class Deferred(Future):
    """A reply that comes later and has a deadline: the socket loop resolves it with
    ``on_deadline()`` (a last answer, or the error saying it ran out of time) if nothing
    else has by then."""

    def __init__(self, deadline: float, on_deadline: Callable[[], dict[str, Any] | WireError]):
        super().__init__()
        self.deadline = deadline  # time.monotonic()
        self._on_deadline = on_deadline

    def resolve(self, outcome: dict[str, Any] | BaseException) -> None:
        """Set the outcome (a result map or an error) unless another thread set it first."""
        with contextlib.suppress(InvalidStateError):
            if isinstance(outcome, BaseException):
                self.set_exception(outcome)
            else:
                self.set_result(outcome)

    def expire(self) -> None:
        self.resolve(self._on_deadline())
