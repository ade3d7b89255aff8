"""What a command may use: typed, instead of the whole daemon."""

from __future__ import annotations

import contextlib
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..caches.manager import PromptCaches
from ..config import Config
from ..models.pool import ModelPool
from ..models.registry import Registry, Resolved
from ..connections import Traffic
from ..outbox import Generation
from ..protocol import WireError
from ..store import ArtifactStore
from ..worker import ModelWorker
from .cache_wait import CacheWaiters


@dataclass(frozen=True)
class Request:
    identity: bytes  # the client's ZeroMQ routing identity
    id: Any
    args: dict[str, Any]  # the operation's fields, checked and with defaults (rkllmd/schema.py)
    client: str = ""  # who the client is, for status (Connections.client_name)
    model: Resolved | None = None  # the model the request names (operations with a ``model`` field)


@dataclass
class Context:
    config: Config  # replaced whole on reload
    caches: PromptCaches
    worker: ModelWorker
    generations: dict[tuple[bytes, Any], Generation]  # live streams by (client, request id)
    waiters: CacheWaiters
    #: One thread for cache work that reads, writes or hashes files, in arrival order:
    #: never on the socket loop, whose every client would wait for the disk.
    disk: Executor
    store: ArtifactStore  # binary caches, kept weights, kernels on disk: counted and collected
    traffic: Traffic
    socket: Path
    started: float  # time.time() at start
    backend_reason: str  # why this backend (replaced when a reload swaps the model)
    registry: Registry  # every model by name
    pool: ModelPool  # the loaded ones; ``worker`` and ``caches`` above are the default model's


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
