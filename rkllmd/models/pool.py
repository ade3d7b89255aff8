"""The loaded models: one backend, worker and prompt caches per weights file, loaded on
demand, within ``daemon.max_loaded_models`` and ``daemon.models_memory_mb``.

Models that share weights (a derived model and its base) share one ``LoadedModel``. The
scheduler (rkllmd/scheduler.py) holds the generations and asks for the models they wait
for (``load``); the loader thread makes room, least recently used idle model first, and
loads it. When every model it could unload is busy, it drains the least recently used
one: the scheduler gives that model nothing received after the oldest request waiting for
the load, and once it is idle it goes. A load that fails ends what waited for it with
``backend``. Embed requests wait here for their model's load. A model's ``keep_alive``
says how long it stays loaded once idle (Ollama's semantics: 0 unloads it as soon as it
is idle, a negative one keeps it until the daemon stops); the loader thread unloads it
once that time has passed, it is idle and no generation waits for it.

The default model (the configuration's ``[model]``) is loaded at start and never
unloaded: the cache operations, ``render`` and the status line run on it. A reload that
changes it loads the new one beside it (rkllmd/app.py) and makes it the default
(``replace_default``): the old one retires, answers what it was given, and is then
unloaded like any other.

Each loaded model runs in a runner process of its own (rkllmd/runner). One that dies has
failed its requests already; the pool then marks the model unloaded (``runner_died``),
and its next request loads it in a new runner. The default model's restarts by itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..backends.base import Backend, BackendError
from ..caches.manager import PromptCaches
from ..caches.waiters import CacheWaiters
from ..outbox import Generation
from ..protocol import ErrorCode, WireError
from ..templates.capabilities import model_capabilities
from ..runner.proxy import RemoteCaches, RunnerProcess
from ..worker import EmbedJob, ModelWorker
from .registry import Model

log = logging.getLogger(__name__)

#: How long the loader waits between looks for room when every loaded model is busy.
ROOM_POLL_S = 0.2
#: How long an unloaded model's worker gets to finish its last call.
UNLOAD_JOIN_S = 30.0


@dataclass(eq=False)
class LoadedModel:
    """One weights file in memory."""

    name: str  # the registry name of the model whose file this is
    worker: ModelWorker | RunnerProcess  # its runner process (daemon.runners = "process"), or a worker in the daemon's
    caches: PromptCaches | RemoteCaches
    waiters: CacheWaiters  # cache.wait answers for these caches
    reason: str  # why this backend
    size: int  # bytes it takes in memory (what the budget counts: backends.memory_estimate)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    #: When it is unloaded once idle (time.monotonic()); None: never.
    expires: float | None = None

    @property
    def backend(self) -> Backend:
        return self.worker.backend

    def busy(self) -> bool:
        return self.worker.busy()

    def answering(self) -> bool:
        return self.worker.answering()

    def public(self, now_wall: float, now: float) -> dict[str, Any]:
        describe = self.backend.describe()
        return {
            "name": self.name, "size": self.size, "pid": self.worker.pid, "loaded_at": self.loaded_at, "backend": self.backend.kind,
            "expires_at": None if self.expires is None else now_wall + max(0.0, self.expires - now),
            "context_length": describe.get("context_length"), "busy": self.busy(),
            "describe": {**describe, "capabilities": list(model_capabilities(self.backend))},
        }


@dataclass(eq=False)
class _Load:
    model: Model
    since: float  # when the oldest request waiting for it arrived (time.monotonic())
    embeds: list[EmbedJob] = field(default_factory=list)  # embed requests waiting for it
    keep_alive: float | None | str = "default"  # what the last request for it said


class ModelPool:
    def __init__(self, open_model: Callable[[Model], LoadedModel], *, max_loaded: int, memory_budget: int,
                 keep_alive: float | None, memory_needed: Callable[[Model], int]):
        self._open = open_model
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget  # bytes; 0: no bound
        self.keep_alive = keep_alive  # the default: seconds, or None (forever)
        self._memory_needed = memory_needed
        self._cond = threading.Condition()
        self._loaded: dict[str, LoadedModel] = {}
        self._pinned: str | None = None
        #: Models a reload replaced: no new work, unloaded once they answered what they were given.
        self._retiring: list[LoadedModel] = []
        self._loads: deque[_Load] = deque()
        self._loading: _Load | None = None
        self._wanted: set[str] = set()  # models generations wait for in the scheduler (not unloaded)
        self._drain: tuple[LoadedModel, float] | None = None  # a model to unload once idle, and since when it takes nothing new
        self._stopping = False
        #: The scheduler's: told when a model is loaded, unloaded or drained (it must take no lock),
        self.on_change: Callable[[], None] = lambda: None
        #: and when a load fails (a model's name, the error its waiting generations end with).
        self.on_load_failed: Callable[[str, WireError], None] = lambda name, error: None
        #: and given back what an unloaded model had not started.
        self.on_returned: Callable[[list[Generation]], None] = lambda gens: None
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)

    def configure(self, *, max_loaded: int, memory_budget: int, keep_alive: float | None) -> None:
        with self._cond:
            self.max_loaded, self.memory_budget, self.keep_alive = max_loaded, memory_budget, keep_alive
            self._cond.notify_all()

    def start(self, default: LoadedModel) -> None:
        """Serve ``default`` (already loaded, never unloaded) and start the loader."""
        with self._cond:
            self._loaded[default.name] = default
            self._pinned = default.name
        self._thread.start()

    # -- from the socket loop -----------------------------------------------------------

    @property
    def default_name(self) -> str | None:
        """The default model's (never unloaded)."""
        return self._pinned

    def drained(self) -> str | None:
        """The model being drained to make room for another, if any."""
        with self._cond:
            return self._drain[0].name if self._drain is not None else None

    def get(self, name: str) -> LoadedModel | None:
        with self._cond:
            return self._loaded.get(name)

    def loaded(self) -> list[LoadedModel]:
        with self._cond:
            return list(self._loaded.values())

    def in_memory(self) -> list[LoadedModel]:
        """The loaded models and those retiring (what the daemon stops, and the watchdog checks)."""
        with self._cond:
            return list(self._loaded.values()) + self._retiring

    def replace_default(self, new: LoadedModel) -> LoadedModel:
        """A reload changed the default model: ``new``, loaded beside it under its name, serves
        it from now on. The one it replaces (returned) retires: it gets no new request,
        answers those it was given (they were rendered for it), and is then unloaded by the
        loader thread, its cache builds abandoned. It counts in the memory budget until
        then. A runner of a retiring model that dies is not restarted."""
        with self._cond:
            assert self._pinned is not None and new.name == self._pinned
            old = self._loaded[self._pinned]
            self._loaded[self._pinned] = new
            self._retiring.append(old)
            if isinstance(old.worker, RunnerProcess):
                old.worker.restart_when_dead = False
            self._cond.notify_all()
        return old

    def loading(self) -> list[str]:
        with self._cond:
            return [load.model.name for load in ([self._loading] if self._loading else []) + list(self._loads)]

    def refresh(self, name: str) -> None:
        """A text cache changed (or was removed): every loaded model's binary cache of it is
        checked, and rebuilt where stale; models loaded later build theirs when they load."""
        for model in self.loaded():
            model.caches.refresh(name)

    def rescan(self) -> None:
        for model in self.loaded():
            model.caches.rescan()

    def want(self, names: set[str]) -> None:
        """The models generations wait for in the scheduler: none of them is unloaded as idle."""
        with self._cond:
            if names != self._wanted:
                self._wanted = names
                self._cond.notify_all()

    def draining(self, model: LoadedModel) -> float | None:
        """Since when ``model`` takes no new generation (it is to be unloaded once idle), or None."""
        with self._cond:
            return self._drain[1] if self._drain is not None and self._drain[0] is model else None

    def touch(self, model: LoadedModel, keep_alive: float | None | str) -> None:
        """``model`` was just given work: its keep_alive counts from now."""
        with self._cond:
            self._touch(model, keep_alive)

    def embed(self, job: EmbedJob, weights: Model, keep_alive: float | None | str = "default") -> None:
        """Run ``job`` on ``weights``' loaded model, loading it first if need be; a failed
        load or a stop ends ``job.future`` with the WireError."""
        with self._cond:
            if self._stopping:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            model = self._loaded.get(weights.name)
            if model is None:
                load = self._load_of(weights, time.monotonic())
                load.embeds.append(job)
                if keep_alive != "default":
                    load.keep_alive = keep_alive  # type: ignore[assignment]
                return
            model.worker.embed(job)  # before its keep_alive may run out: it is busy from now
            self._touch(model, keep_alive)

    def load(self, weights: Model, keep_alive: float | None | str = "default", since: float | None = None) -> None:
        """Load ``weights`` (for generations waiting since ``since``, or without a request:
        Ollama's empty prompt), or refresh its keep_alive if it is loaded."""
        with self._cond:
            model = self._loaded.get(weights.name)
            if model is not None:
                if since is None:
                    self._touch(model, keep_alive)
                    self._cond.notify_all()
                return
            load = self._load_of(weights, time.monotonic() if since is None else since)
            if keep_alive != "default":
                load.keep_alive = keep_alive  # type: ignore[assignment]

    def unload(self, name: str) -> bool:
        """Unload ``name`` as soon as it is idle (keep_alive 0); False if it is not loaded."""
        with self._cond:
            model = self._loaded.get(name)
            if model is None or name == self._pinned:
                return model is not None
            model.expires = time.monotonic()
            self._cond.notify_all()
            return True

    def runner_died(self, runner: RunnerProcess) -> None:
        """A model's runner process died (its requests were failed): the model is unloaded,
        and its next request loads it in a new runner. The default model's runner restarts
        by itself."""
        with self._cond:
            for name, model in list(self._loaded.items()):
                if model.worker is runner and name != self._pinned:
                    del self._loaded[name]
                    log.info("model %s is unloaded: its runner died", name)
            self._cond.notify_all()
        self.on_change()

    def shutdown(self) -> None:
        """Stop loading; the embed requests that waited for a load end "shutting down"."""
        with self._cond:
            self._stopping = True
            embeds = [job for load in self._all_loads() for job in load.embeds]
            for load in self._all_loads():
                load.embeds.clear()
            self._loads.clear()
            self._cond.notify_all()
        _fail(embeds, WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"))

    # -- the loader thread ------------------------------------------------------------------

    def _all_loads(self) -> list[_Load]:
        return ([self._loading] if self._loading is not None else []) + list(self._loads)

    def _load_of(self, weights: Model, since: float) -> _Load:
        for load in self._all_loads():
            if load.model.name == weights.name:
                load.since = min(load.since, since)
                return load
        load = _Load(weights, since)
        self._loads.append(load)
        self._cond.notify_all()
        return load

    def _touch(self, model: LoadedModel, keep_alive: float | None | str) -> None:
        """``model`` was just used: its keep_alive counts from now (lock held)."""
        model.last_used = time.monotonic()
        seconds = self.keep_alive if keep_alive == "default" else keep_alive
        if model.name == self._pinned:
            return
        model.expires = None if seconds is None else model.last_used + seconds  # type: ignore[operator]
        self._cond.notify_all()  # the loader's next wake-up may now be sooner

    def _run(self) -> None:
        while True:
            self._close_retired()
            with self._cond:
                while not self._stopping and not self._loads and not self._expired() and not self._retired():
                    timeout = self._wait_for()
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                expired = self._expired()
                if expired is not None:
                    self._loaded.pop(expired.name)
                elif self._loads:
                    self._loading = self._loads.popleft()
                else:
                    continue  # a retiring model is done: unloaded above
            if expired is not None:
                self._close(expired, "its keep_alive ran out")
                self.on_change()
                continue
            try:
                self._load(self._loading)
            except Exception:  # the loader must outlive any one load
                log.exception("loading a model failed")
            finally:
                with self._cond:
                    self._loading = None

    def _wait_for(self) -> float | None:
        """Seconds until the next keep_alive runs out, or until a retiring model is looked at
        again (lock held)."""
        times = [m.expires for n, m in self._loaded.items() if m.expires is not None and n != self._pinned]
        if self._retiring:
            times.append(time.monotonic())
        # Run out but busy: look again a little later (it is unloaded once idle).
        return max(ROOM_POLL_S, min(times) - time.monotonic()) if times else None

    def _retired(self) -> list[LoadedModel]:
        """Retiring models with no request left to answer (lock held)."""
        return [model for model in self._retiring if not model.answering()]

    def _close_retired(self) -> None:
        """Unload the retiring models that answered all they were given."""
        with self._cond:
            done = self._retired()
            for model in done:
                self._retiring.remove(model)
        for model in done:
            self._close(model, "replaced by a reload")

    def _expired(self) -> LoadedModel | None:
        now = time.monotonic()
        for name, model in self._loaded.items():
            if name != self._pinned and model.expires is not None and model.expires <= now and self._idle(model):
                return model
        return None

    def _idle(self, model: LoadedModel) -> bool:
        """Lock held: nothing to do, and no generation waits for it in the scheduler."""
        return model.name not in self._wanted and not model.busy()

    def _load(self, load: _Load) -> None:
        size = self._memory_needed(load.model)
        if not self._make_room(size, load):
            return
        log.info("loading model %s (%d MiB)", load.model.name, size >> 20)
        started = time.monotonic()
        try:
            model = self._open(load.model)
        except (BackendError, OSError) as exc:
            log.error("cannot load model %s: %s", load.model.name, exc)
            with self._cond:
                embeds, load.embeds = load.embeds, []
            error = WireError(ErrorCode.BACKEND, f"cannot load model {load.model.name}: {exc}")
            self.on_load_failed(load.model.name, error)
            _fail(embeds, error)
            return
        log.info("model %s loaded in %.2f s", load.model.name, time.monotonic() - started)
        with self._cond:
            self._loaded[model.name] = model
            embeds, load.embeds = load.embeds, []
            self._touch(model, load.keep_alive)
            self._cond.notify_all()
        self.on_change()
        for job in embeds:
            try:
                model.worker.embed(job)
            except WireError as exc:
                job.future.set_exception(exc)

    def _make_room(self, size: int, load: _Load) -> bool:
        """Unload least recently used idle models until ``size`` more fits (models a reload
        retired go once they answered theirs). While all that could go are busy, drain the
        least recently used (it takes nothing received after ``load``'s oldest request) and
        wait for it. False: the daemon stops, or it can never fit."""
        try:
            while True:
                self._close_retired()  # this thread unloads them: it must while it waits for room
                with self._cond:
                    if self._stopping:
                        return False
                    in_memory = self.in_memory()
                    used = sum(m.size for m in in_memory)
                    fits = len(in_memory) < self.max_loaded and (not self.memory_budget or used + size <= self.memory_budget)
                    if fits:
                        return True
                    movable = [m for m in self._loaded.values() if m.name != self._pinned]
                    pinned = self._loaded.get(self._pinned or "")
                    if self.memory_budget and size + (pinned.size if pinned else 0) > self.memory_budget or (self.max_loaded <= 1 and pinned):
                        embeds, load.embeds = load.embeds, []
                        error = WireError(ErrorCode.BACKEND, f"model {load.model.name} ({size >> 20} MiB) cannot fit beside the default model within "
                                          f"daemon.max_loaded_models={self.max_loaded} and daemon.models_memory_mb={self.memory_budget >> 20}")
                    else:
                        idle = sorted((m for m in movable if self._idle(m)), key=lambda m: m.last_used)
                        if not idle:
                            if movable:
                                self._start_draining(min(movable, key=lambda m: m.last_used), load)
                            self._cond.wait(ROOM_POLL_S)  # a retiring model may be what has to go
                            continue
                        victim = idle[0]
                        self._loaded.pop(victim.name)
                        error = None
                if error is not None:
                    self.on_load_failed(load.model.name, error)
                    _fail(embeds, error)
                    return False
                self._close(victim, f"to make room for {load.model.name}")
        finally:
            with self._cond:
                self._drain = None
            self.on_change()

    def _start_draining(self, model: LoadedModel, load: _Load) -> None:
        """Lock held: ``model`` takes nothing received since ``load``'s oldest request, so it
        becomes idle and can go (busy models are never unloaded under a request)."""
        if self._drain is not None and self._drain[0] is model and self._drain[1] <= load.since:
            return
        self._drain = (model, load.since)
        log.info("model %s takes no new requests until it is unloaded: model %s waits for room", model.name, load.model.name)
        self.on_change()

    def _close(self, model: LoadedModel, why: str) -> None:
        """Unload ``model`` (taken out of ``_loaded``); generations it had not started go back
        to the scheduler, which gives them to the model's next load."""
        log.info("unloading model %s: %s", model.name, why)
        returned = model.worker.shutdown()  # none, usually: only idle models are unloaded, but one may have just been given
        if not model.worker.join(UNLOAD_JOIN_S):
            log.error("model %s: its worker did not stop within %g s", model.name, UNLOAD_JOIN_S)
        model.caches.close()
        if returned:
            self.on_returned(returned)


def _fail(jobs: list[EmbedJob], error: WireError) -> None:
    for job in jobs:
        job.future.set_exception(error)

