"""The model worker: the one thread that ever touches the backend.

Generations come first. The ones running advance together, a step at a time, up to
``max_batch`` of them (the configuration's, capped by the backend's: the CPU backend
decodes them all in one pass over the weights, a newcomer's prompt a chunk per step;
the NPU runtime runs one whole generation per step). Waiting ones are admitted as room
frees, round-robin by client and in arrival order within a client. Cache builds run
when no generation is due; a build that prefills in chunks (CPU) lets the generations
that arrive meanwhile run between its chunks (``Backend.pause``), on slots of their own.
A model swap waits for the generations that arrived before it. The socket loop only
enqueues and cancels; it never waits for the model.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

from .backends.base import TEXT_CACHE, Backend, BackendError, ContextOverflow, PrefixState, Run
from .caches.binary import BinaryStore
from .caches.manager import PromptCaches
from .config import DaemonConfig
from .constraints import ConstraintError
from .outbox import NO_OUTPUT, Generation, Outbox
from .protocol import ErrorCode, WireError
from .templates.output import wire_tool_calls

log = logging.getLogger(__name__)

#: How long a model load on reload may take before the watchdog calls the worker stuck.
MODEL_SWAP_ALLOWANCE_S = 300.0
#: Clients whose last turn is remembered for the round-robin (the longest unserved go first).
_CLIENTS_REMEMBERED = 4096


@dataclass(eq=False)
class BinaryCacheBuild:
    name: str


@dataclass(eq=False)
class BackendSwap:
    """Load another model in place of the current one (SIGHUP with a changed model)."""

    load: Callable[[], tuple[Backend, str]]
    done: Callable[[Backend, str | None, str | None], None]  # (backend, reason, error)
    asked: float  # time.monotonic(): generations received before it run on the old model


@dataclass(eq=False)
class _Running:
    """A generation the backend is advancing."""

    gen: Generation
    run: Run
    prefix: PrefixState | None
    progress_sent: int = 0


class Counters:
    """Totals reported by status; written by the worker only."""

    def __init__(self) -> None:
        self.generations = 0
        self.completed = 0
        self.cancelled = 0
        self.errors = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ModelWorker:
    def __init__(self, backend: Backend, outbox: Outbox, config: DaemonConfig):
        self.backend = backend
        self.outbox = outbox
        self.max_queue = config.max_queue
        self._batch_limit = config.max_batch
        self.max_batch = min(config.max_batch, backend.max_batch)
        self.caches: PromptCaches | None = None
        self.counters = Counters()
        self.last_error: str | None = None
        self._cond = threading.Condition()
        # Guarded by _cond: what waits, what runs (written by the worker), what is asked for.
        self._waiting: list[Generation] = []  # in arrival order
        self._running: list[_Running] = []
        self._opening: Generation | None = None  # being started (its prefix chosen, maybe built)
        self._builds: deque[BinaryCacheBuild] = deque()
        self._swaps: deque[BackendSwap] = deque()
        self._building: str | None = None
        self._swapping = False
        self._turns = itertools.count()
        self._last_turn: OrderedDict[bytes, int] = OrderedDict()  # client -> when it was last admitted
        self._accepting = True
        self._stopping = False
        self._paused_build = False  # generations are running inside a build's pause
        self.last_progress = time.monotonic()
        self._call_ids = itertools.count()  # tool calls' ids, unique while the daemon runs
        backend.heartbeat = self._heartbeat
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    # -- called from the socket loop (or the cache watcher) ----------------------

    def configure(self, config: DaemonConfig) -> None:
        """Apply a reloaded [daemon] section (the queue and batch limits; requests already queued stay)."""
        self.max_queue = config.max_queue
        self._batch_limit = config.max_batch
        self.max_batch = min(config.max_batch, self.backend.max_batch)

    def start(self) -> None:
        self._thread.start()

    def submit(self, gen: Generation) -> int:
        """Queue a generation; return how many generations are ahead of it."""
        with self._cond:
            if not self._accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise WireError(ErrorCode.QUEUE_FULL, f"{len(self._waiting)} requests are waiting; the limit is {self.max_queue}")
            self._waiting.append(gen)
            self._announce_positions()
            self._cond.notify()
            assert gen.position is not None
            return gen.position

    def schedule_build(self, name: str) -> None:
        with self._cond:
            if any(job.name == name for job in self._builds):
                return
            self._builds.append(BinaryCacheBuild(name))
            self._cond.notify()

    def replace_backend(self, load: Callable[[], tuple[Backend, str]], done: Callable[[Backend, str | None, str | None], None]) -> None:
        """Swap the model once the generations received so far are done; ``done`` hears the outcome."""
        with self._cond:
            self._swaps.append(BackendSwap(load, done, time.monotonic()))
            self._cond.notify()

    def cancel(self, gen: Generation, reason: str = "cancelled") -> str | None:
        """Cancel a queued or running generation: "queued", "running", or None if it is over."""
        with self._cond:
            running = next((r for r in self._running if r.gen is gen), None)
            if gen in self._waiting:
                self._waiting.remove(gen)
                self._announce_positions()
                state = "queued"
            elif running is not None or self._opening is gen:
                state = "running"
            else:
                return None
            gen.cancel_reason = reason
            gen.cancelled.set()
            # Under the lock: the worker cannot have moved on from this generation yet.
            if running is not None:
                running.run.abort()
            elif state == "running":
                self.backend.abort()  # its prefix's build, if it is building one
        if state == "queued":
            self.counters.cancelled += 1
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=reason, **NO_OUTPUT)
        return state

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def activity(self) -> dict[str, Any]:
        with self._cond:
            return {
                "running": "generate" if self._running else ("cache_build" if self._building else None),
                "queued": len(self._waiting),
                "builds_queued": len(self._builds),
                "building": self._building,
            }

    def requests(self) -> dict[str, list[dict[str, Any]]]:
        """The generations running and waiting (in the order they will start), for status."""
        now = time.monotonic()
        with self._cond:
            running = list(self._running)
            queued = self._fair_order()
        return {
            "running": [
                {
                    "id": r.gen.request_id,
                    "client": r.gen.client,
                    "phase": r.run.phase,
                    "prompt_tokens": r.run.stats.prompt_tokens,
                    "prefilled": r.run.stats.prompt_tokens - r.run.to_prefill + r.run.prefilled,
                    "completion_tokens": r.run.stats.completion_tokens,
                    "elapsed_ms": round((now - (r.gen.started or now)) * 1000, 1),
                }
                for r in running
            ],
            "queued": [
                {"id": gen.request_id, "client": gen.client, "position": gen.position, "waited_ms": round((now - gen.received) * 1000, 1)}
                for gen in queued
            ],
        }

    def healthy(self, within: float) -> bool:
        """Idle, or made progress (a step, a prefill chunk) in the last ``within`` seconds.

        Loading a new model on reload is one long call with no progress to report (an NPU
        runtime's init); it gets MODEL_SWAP_ALLOWANCE_S instead.
        """
        with self._cond:
            busy = bool(self._running) or self._opening is not None or self._building is not None
            swapping = self._swapping
        allowance = MODEL_SWAP_ALLOWANCE_S if swapping else within
        return self._thread.is_alive() and (not (busy or swapping) or time.monotonic() - self.last_progress < allowance)

    def shutdown(self) -> list[Generation]:
        """Stop taking work, cut every running generation short ("shutting down"), return the
        queued ones (not run)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            dropped, self._waiting = self._waiting, []
            self._builds.clear()
            self._swaps.clear()
            for running in self._running:
                running.gen.cancel_reason = "shutting down"
                running.gen.cancelled.set()
                running.run.abort()
            if self._opening is not None:
                self._opening.cancel_reason = "shutting down"
                self._opening.cancelled.set()
            self.backend.abort()  # a build, or a generation in one native call
            self._cond.notify()
        return dropped

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the order of the queue (lock held) -----------------------------------------------

    def _fair_order(self) -> list[Generation]:
        """Waiting generations in the order they will start: those before a pending model
        swap first; among them, clients take turns (the one admitted least recently first,
        a new one before all), each client's own in arrival order."""
        swap_at = self._swaps[0].asked if self._swaps else None
        order: list[Generation] = []
        for before_swap in (True, False):
            mine: dict[bytes, list[Generation]] = {}
            for gen in self._waiting:
                if (swap_at is None or gen.received < swap_at) == before_swap:
                    mine.setdefault(gen.identity, []).append(gen)
            clients = sorted(mine, key=lambda c: (self._last_turn.get(c, -1), mine[c][0].received))
            for rank in range(max((len(q) for q in mine.values()), default=0)):
                order += [mine[c][rank] for c in clients if rank < len(mine[c])]
        return order

    def _admissible(self) -> list[Generation]:
        """Waiting generations that may start now, in order (none after a pending swap)."""
        swap_at = self._swaps[0].asked if self._swaps else None
        return [gen for gen in self._fair_order() if swap_at is None or gen.received < swap_at]

    def _announce_positions(self) -> None:
        """Tell every waiting generation whose position changed its new one (``queued``)."""
        ahead = len(self._running) + (self._opening is not None)
        for gen in self._fair_order():
            if gen.position != ahead:
                gen.position = ahead
                self.outbox.stream(gen, "queued", position=ahead)
            ahead += 1

    def _generations_due(self) -> bool:
        with self._cond:
            return bool(self._running) or not self._stopping and bool(self._admissible())

    # -- the worker thread ---------------------------------------------------------

    def _heartbeat(self) -> None:
        self.last_progress = time.monotonic()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._running or self._waiting or self._builds or self._swaps or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._running:
                    return
            try:
                if self._generations_due():
                    self._serve_step()
                elif self._swaps:
                    self._swap()
                elif self._builds:
                    self._build()
            except Exception:  # the worker must outlive any one job
                log.exception("model worker job failed")

    def _serve_step(self) -> None:
        """Admit what fits, then advance every running generation by one step."""
        self._admit()
        with self._cond:
            running = list(self._running)
        if not running:
            return
        try:
            self.backend.step([r.run for r in running])
        except Exception as exc:  # every generation of the step fails; the worker goes on
            error = self._wire_error(exc, running[0].gen)
            for r in running:
                self._end(r, error)
            return
        self._heartbeat()
        for r in running:
            self._report_progress(r)
            if r.run.done:
                self._end(r)

    def _admit(self) -> None:
        """Start waiting generations while there is room; then tell the others where they are."""
        while True:
            with self._cond:
                admissible = self._admissible()
                if self._stopping or len(self._running) >= self.max_batch or not admissible:
                    self._announce_positions()
                    return
                gen = admissible[0]
                self._waiting.remove(gen)
                self._opening = gen
                self._last_turn[gen.identity] = next(self._turns)
                self._last_turn.move_to_end(gen.identity)
                if len(self._last_turn) > _CLIENTS_REMEMBERED:
                    self._last_turn.popitem(last=False)
                self.backend.reset_abort()  # under the lock: a cancel from now on is seen
            running = None
            try:
                running = self._open(gen)
            finally:
                with self._cond:
                    self._opening = None
                    if running is not None:
                        self._running.append(running)
                        if gen.cancelled.is_set():  # cancelled while it opened
                            running.run.abort()

    def _open(self, gen: Generation) -> _Running | None:
        """Start a generation on the backend (its prefix chosen); None if it ended already."""
        started = gen.started = time.monotonic()
        self.counters.generations += 1
        self.outbox.stream(gen, "started", queue_ms=round((started - gen.received) * 1000, 2))
        opened: list[_Running] = []

        def sink(text: str) -> bool:
            if gen.cancelled.is_set():
                return False
            self._report_progress(opened[0])  # the last chunk's, before the text it led to
            self._send_output(gen, *gen.output.feed(text), opened[0].run.take_logprobs())
            return True

        try:
            prefix = self._prefix(gen)  # a cancel during its build aborts the build
            if not gen.cancelled.is_set():
                opened.append(_Running(gen, self.backend.start(gen.prompt, gen.params, prefix, sink), prefix))
        except Exception as exc:
            self._fail(gen, self._wire_error(exc, gen))
            return None
        if not opened:
            self.counters.cancelled += 1
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=gen.cancel_reason, **NO_OUTPUT)
            return None
        return opened[0]

    def _prefix(self, gen: Generation) -> PrefixState | None:
        """The prefix state ``gen`` restores, if any. A cache due for exactly its prefix is
        built first only when nothing else runs: a build would hold up the running streams
        (and never nests in a paused one)."""
        if not gen.use_cache or self.caches is None:
            return None
        with self._cond:
            may_build = not self._running and not self._paused_build
        prefix = self.caches.choose(gen.prompt, gen.cache, build_due=may_build)
        if gen.cache is not None and prefix is None:
            log.warning("request %r asked for cache %s, which could not be used; prefilling in full", gen.request_id, gen.cache)
        return prefix

    def _report_progress(self, running: _Running) -> None:
        run = running.run
        if run.to_prefill and run.prefilled != running.progress_sent:
            running.progress_sent = run.prefilled
            self.outbox.stream(running.gen, "progress", phase="prefill", done=run.prefilled, total=run.to_prefill)

    def _end(self, running: _Running, error: WireError | None = None) -> None:
        """A generation is over: its final message, its counters, its state kept for the next turn."""
        gen, run, prefix = running.gen, running.run, running.prefix
        try:
            if error is not None:
                self._fail(gen, error)
            else:
                self._done(gen, run, prefix)
        finally:
            self.backend.release(run)
            with self._cond:  # positions are told as the next ones are admitted (no transient ones)
                self._running.remove(running)

    def _done(self, gen: Generation, run: Run, prefix: PrefixState | None) -> None:
        stats, output = run.stats, gen.output
        if stats.finish_reason != "cancelled":  # what the splitter held back, tool calls parsed
            self._send_output(gen, *output.finish(), run.take_logprobs())
        total_ms = (time.monotonic() - gen.received) * 1000
        decode_tps = (stats.completion_tokens - 1) / (stats.decode_ms / 1000) if stats.decode_ms > 0 and stats.completion_tokens > 1 else None
        counters = self.counters
        counters.completed += stats.finish_reason != "cancelled"
        counters.cancelled += stats.finish_reason == "cancelled"
        counters.prompt_tokens += stats.prompt_tokens
        counters.cached_tokens += stats.cached_tokens
        counters.completion_tokens += stats.completion_tokens
        restored_from = prefix.source() if prefix is not None and stats.cached_tokens else None
        if gen.use_cache and self.caches is not None:
            # Before done: once a client has its answer, its next turn (or status) finds the
            # state kept. The copy delays done by milliseconds, never the first token.
            try:
                self.caches.keep_conversation(run)
            except Exception:  # the answer stands without it
                log.exception("keeping the conversation state of %r failed", gen.request_id)
        started = gen.started or gen.received
        self.outbox.stream(
            gen,
            "done",
            finish_reason=stats.finish_reason,
            reason=gen.cancel_reason if stats.finish_reason == "cancelled" else None,
            cache=prefix.name if restored_from is not None and prefix.kind == TEXT_CACHE else None,
            reasoning=output.reasoning,
            tool_calls=wire_tool_calls(output.tool_calls, self._call_ids) or None,
            tool_call_error=output.tool_call_error,
            stats={
                "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_tokens,
                "cache_source": restored_from,
                "completion_tokens": stats.completion_tokens,
                "queue_ms": round((started - gen.received) * 1000, 2),
                "ttft_ms": round(stats.ttft_ms, 2),
                "prefill_ms": round(stats.prefill_ms, 2),
                "decode_ms": round(stats.decode_ms, 2),
                "decode_tps": None if decode_tps is None else round(decode_tps, 2),
                "total_ms": round(total_ms, 2),
            },
        )

    def _build(self) -> None:
        """The next cache build; generations that arrive meanwhile run in its pauses."""
        with self._cond:
            if not self._builds or self._stopping:
                return
            job = self._builds.popleft()
            self._building = job.name
            self.backend.reset_abort()
        self.backend.pause = self._pause
        try:
            assert self.caches is not None
            self.caches.build(job.name)
        finally:
            self.backend.pause = lambda: None
            with self._cond:
                self._building = None

    def _pause(self) -> None:
        """Between a build's prefill chunks: serve the generations due, then let it go on."""
        self._paused_build = True
        try:
            while self._generations_due():
                self._serve_step()
        finally:
            self._paused_build = False

    def _swap(self) -> None:
        with self._cond:
            job = self._swaps.popleft()
            self._swapping = True
        try:
            self._load_swap(job)
        finally:
            with self._cond:
                self._swapping = False
                self._announce_positions()

    def _load_swap(self, job: BackendSwap) -> None:
        try:
            backend, reason = job.load()
        except BackendError as exc:
            log.error("reload: cannot load the new model, keeping the running one: %s", exc)
            job.done(self.backend, None, str(exc))
            return
        old, self.backend = self.backend, backend
        backend.heartbeat = self._heartbeat
        self.max_batch = min(self._batch_limit, backend.max_batch)
        old.close()
        if self.caches is not None:
            # Every binary cache now belongs to another identity: none of the old ones is used.
            self.caches.relocate(self.caches.texts, BinaryStore(self.caches.binaries.root, backend.identity()), backend)
        log.info("reload: now serving %s", backend.describe().get("name", backend.kind))
        job.done(backend, reason, None)

    def _send_output(self, gen: Generation, reasoning: str, text: str, logprobs: list[dict[str, Any]]) -> None:
        """A token message: answer ``text`` (maybe ""), and ``reasoning`` and the tokens'
        ``logprobs`` when there are some."""
        extra: dict[str, Any] = {}
        if reasoning:
            extra["reasoning"] = reasoning
        if logprobs:
            extra["logprobs"] = logprobs
        if text or extra:
            self.outbox.stream(gen, "token", text=text, **extra)

    def _wire_error(self, exc: Exception, gen: Generation) -> WireError:
        if isinstance(exc, ConstraintError):  # found against the model's vocabulary, or unsupported by its backend
            return WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field)
        if isinstance(exc, ContextOverflow):
            return WireError(ErrorCode.CONTEXT_OVERFLOW, str(exc), prompt_tokens=exc.prompt_tokens, context_length=exc.context_length)
        if isinstance(exc, BackendError):
            return WireError(ErrorCode.BACKEND, str(exc), **({} if exc.runtime_code is None else {"runtime_code": exc.runtime_code}))
        log.error("generation %r failed", gen.request_id, exc_info=exc)
        return WireError(ErrorCode.INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}")

    def _fail(self, gen: Generation, error: WireError) -> None:
        self.counters.errors += 1
        if error.code in (ErrorCode.BACKEND, ErrorCode.INTERNAL):
            self.last_error = error.message
        self.outbox.stream(gen, "error", error=error.to_wire())
