"""What a command may use: typed, instead of the whole daemon."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..caches.manager import PromptCaches
from ..deferred import Deferred  # noqa: F401 (the socket loop's, from here)
from ..inquiries import Inquiries
from ..config import Config
from ..models.pool import LoadedModel, ModelPool
from ..models.registry import Registry, Resolved
from ..connections import Traffic
from ..outbox import Generation, Outbox
from ..protocol import ErrorCode, WireError
from ..store import ArtifactStore
from ..runner.proxy import RemoteCaches, RunnerProcess
from ..scheduler import Scheduler
from ..worker import ModelWorker

T = TypeVar("T")


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
    caches: PromptCaches | RemoteCaches
    worker: ModelWorker | RunnerProcess
    generations: dict[tuple[bytes, Any], Generation]  # live streams by (client, request id)
    #: One thread for cache work that reads, writes or hashes files, in arrival order:
    #: never on the socket loop, whose every client would wait for the disk.
    disk: Executor
    inquiries: Inquiries  # where status and models gather their answers, off the socket loop
    store: ArtifactStore  # binary caches, kept weights, kernels on disk: counted and collected
    traffic: Traffic
    socket: Path
    started: float  # time.time() at start
    backend_reason: str  # why this backend (replaced when a reload changes the default model)
    registry: Registry  # every model by name
    pool: ModelPool  # the loaded ones; ``worker`` and ``caches`` above are the default model's
    scheduler: Scheduler  # every generation between its arrival and its model's runner
    outbox: Outbox  # streams that are no model's work (a pull's progress) go out through it

    def on_serving(self, model: LoadedModel, work: Callable[[LoadedModel], T]) -> T:
        """``work`` on the loaded model serving ``model``'s name now (for an operation that
        waited for the disk thread: the new default model a reload put in place of ``model``
        meanwhile); once more on its successor if the switch came while ``work`` ran, and the
        replaced model's runner ended under it."""
        serving = self.pool.get(model.name) or model
        try:
            return work(serving)
        except WireError as exc:
            successor = self.pool.get(model.name) or model
            if exc.code != ErrorCode.BACKEND or successor is serving:
                raise
            return work(successor)

    def loaded_model(self, request: Request) -> LoadedModel:
        """The loaded weights of the model ``request`` names (its binary caches are theirs),
        or ``not_found`` saying it is not loaded (its caches are built when it loads)."""
        assert request.model is not None  # the socket loop resolved it
        loaded = self.pool.get(request.model.weights.name)
        if loaded is None:
            name = request.model.model.name
            raise WireError(ErrorCode.NOT_FOUND, f"model {name} is not loaded: its binary caches are built when it loads (load it, or send it a request)",
                            model=name, loaded=False)
        return loaded
