"""The scheduler: every generation request between its arrival and its model's runner.

One queue for the whole daemon, across models, so that what waits is ordered and bounded
in one place:

- **Admission.** ``daemon.max_queue`` bounds the generations waiting in the daemon, for
  any model, loaded or not (those given to a runner and not started count too); more are
  refused with ``queue_full``.
- **Order.** Clients take turns, across every model: the client given a generation least
  recently goes first (a new one before all), each client's own in arrival order. A
  client is a connection, and the person it asks for (``on_behalf_of``: the HTTP gateway
  names each of its users, so they take turns too).
  ``queued`` positions are this order's: generations ahead of it for its model, the ones
  its runner holds included.
- **Dispatch.** A generation goes to its model's runner (or worker) only when it can start
  there: while the runner's generations hold fewer than its ``max_batch`` places (one
  waiting for a cache build holds none: the runner serves others in the build's pauses).
  No runner keeps a queue of its own to reorder; its prompt thread prepares a generation
  as it arrives, while the others keep decoding.
- **Loads and fairness between models.** A generation whose model is not loaded asks the
  pool to load it (it waits here, hearing its position). When the pool must unload a
  busy model to make room, it drains it (``ModelPool.draining``): that model is given no
  generation received after the oldest one waiting for the load, finishes what it has and
  is unloaded; so clients that keep one model busy cannot keep another out for ever. The
  model's later requests load it again in their turn.
- **Builds** run in each model's runner, between its generations' steps and chunks, aged
  so steady traffic cannot starve them (worker.py). Generations of every model come
  first: while one model generates, the others' builds wait (``others_generating``), up
  to ``build_max_wait_ms`` at a time, then get a chunk.

The socket loop only submits and cancels; a thread of the scheduler's own gives
generations to runners when an event may have made room: a generation of a runner
started or ended (``Outbox.on_event``), a model loaded, unloaded or drained (the pool's
``on_change``). Those events only set an Event: no lock of a runner or of the pool is ever
held while the scheduler's is taken, which is taken first.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from .models.pool import LoadedModel, ModelPool
from .models.registry import Model
from .outbox import NO_OUTPUT, Generation, Outbox
from .protocol import ErrorCode, WireError
from .turns import Turns

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiting:
    gen: Generation
    weights: Model  # the weights that run it (a derived model's base)
    keep_alive: float | None | str  # what the request said ("default": nothing)


class Scheduler:
    def __init__(self, pool: ModelPool, outbox: Outbox, *, max_queue: int):
        self._pool = pool
        self._outbox = outbox
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []  # in arrival order
        self._given: dict[Any, dict[Generation, _Waiting]] = {}  # a runner (or worker) -> generations given to it, not ended
        self._turns = Turns()  # by Generation.turn: served when given to a runner
        self._ended: dict[str, dict[str, int]] = {}  # by model: generations that ended here ("cancelled", "errors")
        self._told: dict[Any, bool] = {}  # a runner -> whether it was last told another model generates
        self._due = threading.Event()  # something may have made room
        self._stopping = False
        pool.on_change = self._due.set
        pool.on_load_failed = self._load_failed
        pool.on_returned = self._returned
        outbox.on_event = self._due.set
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def configure(self, max_queue: int) -> None:
        with self._lock:
            self.max_queue = max_queue

    # -- from the socket loop ---------------------------------------------------------------

    def submit(self, gen: Generation, weights: Model, keep_alive: float | None | str = "default") -> None:
        """Admit ``gen`` (or WireError ``queue_full``); it hears its position at once."""
        with self._lock:
            if self._stopping:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            waiting = len(self._waiting) + sum(1 for given in self._given.values() for g in given if g.started is None and not g.ended)
            if waiting >= self.max_queue:
                raise WireError(ErrorCode.QUEUE_FULL, f"{waiting} requests are waiting; the limit is {self.max_queue}")
            self._waiting.append(_Waiting(gen, weights, keep_alive))
            self._announce_positions()
        self._due.set()

    def cancel(self, gen: Generation, reason: str = "cancelled") -> str | None:
        """Cancel a generation wherever it is: "queued", "running", or None if it is over."""
        with self._lock:
            item = next((w for w in self._waiting if w.gen is gen), None)
            if item is None:
                worker = gen.worker
            else:
                self._waiting.remove(item)
                self._count(item.weights.name, "cancelled")
                self._announce_positions()
        if item is None:
            return None if worker is None else worker.cancel(gen, reason)
        gen.cancel_reason = reason
        gen.cancelled.set()
        self._outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=reason, **NO_OUTPUT)
        return "queued"

    def replace_default(self, new: LoadedModel) -> LoadedModel:
        """A reload's switch (``ModelPool.replace_default``): the generations waiting here for
        the default model were received before it, so they go to the model it replaces first,
        which answers them (its runner queues them) before it is unloaded."""
        with self._lock:
            old = self._pool.get(new.name)
            assert old is not None
            for item in [w for w in self._waiting if w.weights.name == new.name]:
                self._give(item, old)
            self._pool.replace_default(new)
            self._announce_positions()
        return old

    def waiting(self, weights_name: str) -> int:
        """Generations waiting here for ``weights_name``'s model."""
        with self._lock:
            return sum(1 for w in self._waiting if w.weights.name == weights_name)

    def ended(self, weights_name: str) -> dict[str, int]:
        """``weights_name``'s generations that ended here, never given to its runner: cancelled, or failed."""
        with self._lock:
            return dict(self._ended.get(weights_name, {"cancelled": 0, "errors": 0}))

    def _count(self, weights_name: str, what: str) -> None:
        counts = self._ended.setdefault(weights_name, {"cancelled": 0, "errors": 0})
        counts[what] += 1

    def waiting_by_model(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for w in self._waiting:
                counts[w.weights.name] = counts.get(w.weights.name, 0) + 1
            return counts

    def requests(self) -> list[dict[str, Any]]:
        """The generations waiting here, in the order they will be given to their runners."""
        now = time.monotonic()
        with self._lock:
            return [{"id": w.gen.request_id, "client": w.gen.client, "model": w.weights.name, "position": w.gen.position,
                     "waited_ms": round((now - w.gen.received) * 1000, 1)} for w in self._fair_order()]

    def shutdown(self) -> list[Generation]:
        """Stop giving work out; return the generations that waited here (not run)."""
        with self._lock:
            self._stopping = True
            dropped, self._waiting = [w.gen for w in self._waiting], []
        self._due.set()
        return dropped

    # -- the scheduler's thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._stopping:
                return
            try:
                self._dispatch()
            except Exception:  # the scheduler must outlive any one mistake
                log.exception("scheduling failed")

    def _dispatch(self) -> None:
        """Give every generation that can start now to its runner, in turn; ask the pool to
        load the models that generations wait for."""
        loads: dict[str, tuple[_Waiting, float]] = {}  # a model to load: its first in turn, its oldest waiting's arrival
        with self._lock:
            for runner, given in list(self._given.items()):
                for gen in [g for g in given if g.ended]:
                    del given[gen]
                if not given:
                    del self._given[runner]
            room: dict[int, int] = {}
            wanted: set[str] = set()
            for item in self._fair_order():
                loaded = self._pool.get(item.weights.name)
                if loaded is None:
                    first, since = loads.get(item.weights.name, (item, item.gen.received))
                    loads[item.weights.name] = (first, min(since, item.gen.received))
                    wanted.add(item.weights.name)  # once loaded, it is not unloaded before it gets them
                    continue
                cutoff = self._pool.draining(loaded)
                if cutoff is not None and item.gen.received >= cutoff:
                    continue  # it goes once the model is unloaded and loaded again
                wanted.add(item.weights.name)
                free = room.get(id(loaded), loaded.worker.max_batch - _holding(self._given.get(loaded.worker, {})))
                if free > 0:
                    room[id(loaded)] = free - 1
                    self._give(item, loaded)
            self._announce_positions()
            generating = {runner for runner, given in self._given.items() if any(g.started is not None and not g.ended for g in given)}
        self._pool.want(wanted)
        self._tell_builds(generating)
        for item, since in loads.values():
            self._pool.load(item.weights, item.keep_alive, since=since)

    def _tell_builds(self, generating: set[Any]) -> None:
        """Tell each model whether another model's generations run: its cache builds wait
        for them (up to ``build_max_wait_ms`` at a time), as they wait for its own."""
        runners = [model.worker for model in self._pool.in_memory()]
        for runner in runners:
            others = bool(generating - {runner})
            if self._told.get(runner) != others:
                runner.others_generating(others)
        self._told = {runner: bool(generating - {runner}) for runner in runners}  # unloaded ones forgotten

    def _give(self, item: _Waiting, loaded: LoadedModel) -> None:
        """Lock held: ``item`` to ``loaded``'s runner (its stream ends with the runner's error
        if it refuses it)."""
        gen = item.gen
        try:
            loaded.worker.submit(gen)
        except WireError as exc:
            if exc.code == ErrorCode.SHUTTING_DOWN and not self._stopping:
                return  # the model is being unloaded: it waits for its next load
            self._waiting.remove(item)
            self._count(item.weights.name, "errors")
            self._outbox.stream(gen, "error", error=exc.to_wire())
            return
        self._waiting.remove(item)
        gen.worker = loaded.worker
        self._given.setdefault(loaded.worker, {})[gen] = item
        self._pool.touch(loaded, item.keep_alive)
        self._turns.served(gen.turn)

    def _returned(self, gens: list[Generation]) -> None:
        """An unloaded model gave back generations it had not started: they wait again, in
        their place by arrival, for the model's next load."""
        with self._lock:
            for gen in gens:
                item = next((given.pop(gen) for given in self._given.values() if gen in given), None)
                if item is None or gen.ended:
                    continue
                gen.worker = None
                self._waiting.append(item)
            self._waiting.sort(key=lambda w: w.gen.received)
            self._announce_positions()
        self._due.set()

    def _load_failed(self, name: str, error: WireError) -> None:
        """The pool could not load ``name``: what waited for it ends with ``error``."""
        with self._lock:
            failed = [w.gen for w in self._waiting if w.weights.name == name]
            self._waiting = [w for w in self._waiting if w.weights.name != name]
            for _ in failed:
                self._count(name, "errors")
            self._announce_positions()
        for gen in failed:
            self._outbox.stream(gen, "error", error=error.to_wire())

    # -- the order (lock held) ------------------------------------------------------------------

    def _fair_order(self) -> list[_Waiting]:
        """Clients take turns (the one given a generation least recently first, a new one
        before all), each client's own in arrival order."""
        return self._turns.order(self._waiting, lambda w: w.gen.turn, lambda w: w.gen.received)

    def _announce_positions(self) -> None:
        """Tell every waiting generation whose position changed its new one (``queued``):
        the generations ahead of it for its model, its runner's included."""
        ahead: dict[str, int] = {}
        for item in self._fair_order():
            name = item.weights.name
            if name not in ahead:
                loaded = self._pool.get(name)
                ahead[name] = 0 if loaded is None else sum(1 for g in self._given.get(loaded.worker, ()) if not g.ended)
            position = ahead[name]
            ahead[name] += 1
            if item.gen.position != position:
                item.gen.position = position
                self._outbox.stream(item.gen, "queued", position=position)


def _holding(given: dict[Generation, _Waiting]) -> int:
    """Places in a runner's batch its generations hold: all but those waiting for a cache build."""
    return sum(1 for gen in given if not gen.ended and (gen.started is not None or gen.waits_for_build is None))
