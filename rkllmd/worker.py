"""The model worker: the one thread that ever touches the backend.

Generations and cache builds run one at a time, in arrival order, from one queue. The
socket loop only enqueues and cancels; it never waits for the model.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .backends.base import TEXT_CACHE, Backend, BackendError, ContextOverflow
from .caches.binary import BinaryStore
from .caches.manager import PromptCaches
from .config import DaemonConfig
from .outbox import NO_OUTPUT, Generation, Outbox
from .protocol import ErrorCode, WireError
from .templates.output import wire_tool_calls

log = logging.getLogger(__name__)

#: How long a model load on reload may take before the watchdog calls the worker stuck.
MODEL_SWAP_ALLOWANCE_S = 300.0


@dataclass(eq=False)
class BinaryCacheBuild:
    name: str


@dataclass(eq=False)
class BackendSwap:
    """Load another model in place of the current one (SIGHUP with a changed model)."""

    load: Callable[[], tuple[Backend, str]]
    done: Callable[[Backend, str | None, str | None], None]  # (backend, reason, error)


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
        self.max_batch = min(config.max_batch, backend.max_batch)
        self.caches: PromptCaches | None = None
        self.counters = Counters()
        self.last_error: str | None = None
        self._jobs: deque[Generation | BinaryCacheBuild | BackendSwap] = deque()
        self._cond = threading.Condition()
        self._running: Generation | BinaryCacheBuild | BackendSwap | None = None
        self._accepting = True
        self._stopping = False
        self.last_progress = time.monotonic()
        self._call_ids = itertools.count()  # tool calls' ids, unique while the daemon runs
        backend.heartbeat = self._heartbeat
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    # -- called from the socket loop (or the cache watcher) ----------------------

    def configure(self, config: DaemonConfig) -> None:
        """Apply a reloaded [daemon] section (the queue and batch limits; requests already queued stay)."""
        self.max_queue = config.max_queue
        self.max_batch = min(config.max_batch, self.backend.max_batch)

    def start(self) -> None:
        self._thread.start()

    def submit(self, gen: Generation) -> int:
        """Queue a generation; return how many generations are ahead of it."""
        with self._cond:
            if not self._accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            waiting = sum(isinstance(j, Generation) for j in self._jobs)
            if waiting >= self.max_queue:
                raise WireError(ErrorCode.QUEUE_FULL, f"{waiting} requests are waiting; the limit is {self.max_queue}")
            ahead = waiting + isinstance(self._running, Generation)
            gen.position = ahead
            self.outbox.stream(gen, "queued", position=ahead)
            self._jobs.append(gen)
            self._cond.notify()
            return ahead

    def _announce_positions(self) -> None:
        """Send ``queued`` again to every waiting generation whose position changed (lock held)."""
        ahead = int(isinstance(self._running, Generation))
        for job in self._jobs:
            if isinstance(job, Generation):
                if job.position != ahead:
                    job.position = ahead
                    self.outbox.stream(job, "queued", position=ahead)
                ahead += 1

    def schedule_build(self, name: str) -> None:
        with self._cond:
            if any(isinstance(j, BinaryCacheBuild) and j.name == name for j in self._jobs):
                return
            self._jobs.append(BinaryCacheBuild(name))
            self._cond.notify()

    def replace_backend(self, load: Callable[[], tuple[Backend, str]], done: Callable[[Backend, str | None, str | None], None]) -> None:
        """Swap the model after the work queued so far; ``done`` hears the outcome."""
        with self._cond:
            self._jobs.append(BackendSwap(load, done))
            self._cond.notify()

    def cancel(self, gen: Generation, reason: str = "cancelled") -> str | None:
        """Cancel a queued or running generation: "queued", "running", or None if it is over."""
        with self._cond:
            if gen in self._jobs:
                self._jobs.remove(gen)
                self._announce_positions()
                state = "queued"
            elif self._running is gen:
                state = "running"
            else:
                return None
            gen.cancel_reason = reason
            gen.cancelled.set()
            if state == "running":
                # Under the lock: the worker cannot have moved on to another job yet.
                self.backend.abort()
        if state == "queued":
            self.counters.cancelled += 1
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=reason, **NO_OUTPUT)
        return state

    def queue_depth(self) -> int:
        with self._cond:
            return sum(isinstance(j, Generation) for j in self._jobs)

    def activity(self) -> dict[str, Any]:
        with self._cond:
            running = self._running
            return {
                "running": "generate" if isinstance(running, Generation) else ("cache_build" if running else None),
                "queued": sum(isinstance(j, Generation) for j in self._jobs),
                "builds_queued": sum(isinstance(j, BinaryCacheBuild) for j in self._jobs),
                "building": running.name if isinstance(running, BinaryCacheBuild) else None,
            }

    def requests(self) -> dict[str, list[dict[str, Any]]]:
        """The generations running and waiting, for status."""
        now = time.monotonic()
        with self._cond:
            running = [self._running] if isinstance(self._running, Generation) else []
            queued = [j for j in self._jobs if isinstance(j, Generation)]
        return {
            "running": [
                {
                    "id": gen.request_id,
                    "client": gen.client,
                    "phase": gen.phase,
                    "prompt_tokens": gen.prompt_tokens,
                    "prefilled": gen.prefilled,
                    "completion_tokens": gen.completion_tokens,
                    "elapsed_ms": round((now - (gen.started or now)) * 1000, 1),
                }
                for gen in running
            ],
            "queued": [
                {"id": gen.request_id, "client": gen.client, "position": gen.position, "waited_ms": round((now - gen.received) * 1000, 1)}
                for gen in queued
            ],
        }

    def healthy(self, within: float) -> bool:
        """Idle, or made progress (a token, a prefill chunk) in the last ``within`` seconds.

        Loading a new model on reload is one long call with no progress to report (an NPU
        runtime's init); it gets MODEL_SWAP_ALLOWANCE_S instead.
        """
        with self._cond:
            running = self._running
        allowance = MODEL_SWAP_ALLOWANCE_S if isinstance(running, BackendSwap) else within
        return self._thread.is_alive() and (running is None or time.monotonic() - self.last_progress < allowance)

    def shutdown(self) -> list[Generation]:
        """Stop taking work, abort the running generation, return the queued ones (not run)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            dropped = [j for j in self._jobs if isinstance(j, Generation)]
            self._jobs.clear()
            running = self._running
            if isinstance(running, Generation):
                running.cancel_reason = "shutting down"
                running.cancelled.set()
            if running is not None:
                self.backend.abort()
            self._cond.notify()
        return dropped

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker thread ---------------------------------------------------------

    def _heartbeat(self) -> None:
        self.last_progress = time.monotonic()
        running = self._running
        if isinstance(running, Generation) and running.phase == "decode":
            running.completion_tokens += 1  # a backend beats once a token while it decodes

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._running = job
                self._announce_positions()
                self.backend.reset_abort()  # under the lock: a cancel from now on is seen
                self.last_progress = time.monotonic()
            try:
                if isinstance(job, Generation):
                    self._generate(job)
                elif isinstance(job, BinaryCacheBuild):
                    assert self.caches is not None
                    self.caches.build(job.name)
                else:
                    self._swap(job)
            except Exception:  # the worker must outlive any one job
                log.exception("model worker job failed")
            finally:
                with self._cond:
                    self._running = None

    def _swap(self, job: BackendSwap) -> None:
        try:
            backend, reason = job.load()
        except BackendError as exc:
            log.error("reload: cannot load the new model, keeping the running one: %s", exc)
            job.done(self.backend, None, str(exc))
            return
        old, self.backend = self.backend, backend
        backend.heartbeat = self._heartbeat
        old.close()
        if self.caches is not None:
            # Every binary cache now belongs to another identity: none of the old ones is used.
            self.caches.relocate(self.caches.texts, BinaryStore(self.caches.binaries.root, backend.identity()), backend)
        log.info("reload: now serving %s", backend.describe().get("name", backend.kind))
        job.done(backend, reason, None)

    def _generate(self, gen: Generation) -> None:
        started = gen.started = time.monotonic()
        self.counters.generations += 1
        self.outbox.stream(gen, "started", queue_ms=round((started - gen.received) * 1000, 2))
        gen.prompt_tokens = self.backend.count_tokens(gen.prompt)
        prefix = None
        if gen.use_cache and self.caches is not None:
            prefix = self.caches.choose(gen.prompt, gen.cache)
        if gen.cache is not None and prefix is None:
            log.warning("request %r asked for cache %s, which could not be used; prefilling in full", gen.request_id, gen.cache)

        def sink(text: str) -> bool:
            if gen.cancelled.is_set():
                return False
            gen.phase = "decode"
            self._send_output(gen, *gen.output.feed(text))
            return True

        def progress(done: int, total: int) -> None:
            gen.prefilled = gen.prompt_tokens - total + done
            if done == total:
                gen.phase = "decode"
            if done:
                self.outbox.stream(gen, "progress", phase="prefill", done=done, total=total)

        try:
            if gen.cancelled.is_set():
                raise _Cancelled
            stats = self.backend.generate(gen.prompt, gen.params, prefix, sink, progress)
        except _Cancelled:
            self.counters.cancelled += 1
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=gen.cancel_reason, **NO_OUTPUT)
            return
        except ContextOverflow as exc:
            self._fail(gen, WireError(ErrorCode.CONTEXT_OVERFLOW, str(exc), prompt_tokens=exc.prompt_tokens, context_length=exc.context_length))
            return
        except BackendError as exc:
            details = {} if exc.runtime_code is None else {"runtime_code": exc.runtime_code}
            self._fail(gen, WireError(ErrorCode.BACKEND, str(exc), **details))
            return
        except Exception as exc:
            log.exception("generation %r failed", gen.request_id)
            self._fail(gen, WireError(ErrorCode.INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}"))
            return
        output = gen.output
        if stats.finish_reason != "cancelled":  # what the splitter held back, tool calls parsed
            self._send_output(gen, *output.finish())
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
                self.caches.keep_conversation()
            except Exception:  # the answer stands without it
                log.exception("keeping the conversation state of %r failed", gen.request_id)
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

    def _send_output(self, gen: Generation, reasoning: str, text: str) -> None:
        """A token message: answer ``text`` (maybe ""), and ``reasoning`` when there is some."""
        if reasoning:
            self.outbox.stream(gen, "token", text=text, reasoning=reasoning)
        elif text:
            self.outbox.stream(gen, "token", text=text)

    def _fail(self, gen: Generation, error: WireError) -> None:
        self.counters.errors += 1
        if error.code in (ErrorCode.BACKEND, ErrorCode.INTERNAL):
            self.last_error = error.message
        self.outbox.stream(gen, "error", error=error.to_wire())


class _Cancelled(Exception):
    """Cancelled after being taken from the queue but before the backend started."""
