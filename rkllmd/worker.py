"""The model worker: the one thread that ever runs the backend, and its prompt thread.

Generations come first. The ones running advance together, a step at a time, up to
``max_batch`` of them (the configuration's, capped by the backend's: the CPU backend
decodes them all in one pass over the weights, a newcomer's prompt a chunk per step;
the NPU runtime runs one whole generation per step). Waiting ones are admitted as room
frees, round-robin by client and in arrival order within a client, once their prompt is
prepared.

Prompts are prepared on a thread of their own, in arrival order: rendered with the chat
template of the worker's model and tokenized; the worker admits only prepared ones.
Tokenizing a long text takes a while (a second for 250,000 characters on the CPU
backend's tokenizer): neither the socket loop nor the running generations wait for it.
``render`` requests run on the same thread.

Cache builds run when no generation is due, or when one has waited ``build_max_wait_ms``
for the model: builds queued by a text cache's change and builds a request needs for its
prefix alike (the latter only when nothing else runs). A build that prefills in chunks
(CPU) lets the generations due meanwhile run between its chunks (``Backend.pause``), until
it has waited that long for its next chunk: then it gets it. So builds never hold up
interactive work for long, and steady traffic cannot starve them.

Embedding requests are tokenized on the prompt thread too, then run on the worker before
the generations' next step: each forward pass of one (a list's inputs packed into as few
as the rows allow, in scratch state of their own) is followed by a step of the generations
running, so neither holds up the other for more than a pass.

Each job has its own cancellation: a generation's is its run's (``Run.abort``), a build's
the backend's flag (``Backend.abort``); cancelling one never stops the other. A worker
serves one model for its whole life (a reload that changes the default model starts
another worker beside it: rkllmd/models/pool.py). The socket loop only enqueues and
cancels; it never waits for the model. The worker closes the backend itself when it stops,
after its last call returned: a handle is never released while a native call still uses it.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from .backends.base import TEXT_CACHE, Backend, BackendError, ContextOverflow, PrefixState, Run
from .caches.manager import PromptCaches
from .config import DaemonConfig
from .constraints import Constraint, ConstraintError, from_request
from .outbox import NO_OUTPUT, Chat, Generation, Outbox
from .protocol import ErrorCode, WireError
from .templates import FAMILIES, ChatTemplate, RenderError
from .templates.capabilities import CapabilityMissing, require_capabilities, require_completion
from .templates.output import OutputSplitter, wire_tool_calls
from .turns import Turns

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class BinaryCacheBuild:
    name: str
    #: Since when it waits for the model: queued, or its last prefill chunk done.
    waiting_since: float = field(default_factory=time.monotonic)
    #: The generation it is built for, before that one prefills (None: queued by a text's change).
    owner: Generation | None = None

    def overdue(self, bound: float) -> bool:
        return time.monotonic() - self.waiting_since >= bound


@dataclass(eq=False)
class _PromptJob:
    """Work for the prompt thread: ``work(backend)`` with the worker's backend."""

    work: Callable[[Backend], Any]
    future: Future


@dataclass(eq=False)
class EmbedJob:
    """An embed request: its inputs (texts, or token ids), what to do with them, its answer."""

    inputs: list[str | list[int]]
    truncate: bool
    normalize: bool
    future: Future
    received: float = field(default_factory=time.monotonic)
    # Written by its preparation: each input as the backend runs it (token ids; text where
    # the backend has no tokenizer of its own), cut to the context.
    prepared: list[Sequence[int] | str] | None = None


class EmbedStopped(Exception):
    """The daemon stops: the embedding under way ends between two forward passes."""


@dataclass(eq=False)
class _Running:
    """A generation the backend is advancing."""

    gen: Generation
    run: Run
    prefix: PrefixState | None
    progress_sent: int = 0


class Counters:
    """Totals reported by status; written by the worker (``errors`` also by its prompt thread,
    under the worker's lock)."""

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


def prepared_prompt(backend: Backend, chat: Chat) -> tuple[str, OutputSplitter, Constraint | None]:
    """``chat`` rendered with ``backend``'s template, the splitter of that prompt's output
    (a raw prompt's output is the text as the model wrote it: no template says where its
    reasoning or calls are), and the constraint the chat asks for as this template shapes
    it (a reasoning block before the answer; a forced call in its own format)."""
    if chat.raw is not None:
        require_completion(backend)
        return chat.raw, OutputSplitter(None), constraint_of(chat, None, "")
    template = chat_template(backend, chat)
    require_capabilities(backend, chat, template)
    renderer = backend if template is backend.template else template  # the backend's render is the usual way in
    prompt = renderer.render(chat.messages, True, tools=chat.tools, variables=chat.variables)
    constraint = constraint_of(chat, template, prompt)
    tool_format = constraint.tool_format if constraint is not None else None
    return prompt, OutputSplitter.for_prompt(template, prompt, tools=bool(chat.tools), tool_format=tool_format), constraint


def chat_template(backend: Backend, chat: Chat) -> ChatTemplate:
    """The template ``chat`` renders with: its model's own (a derived model's family or
    Jinja text, given the weights' special tokens), else the backend's."""
    if not chat.template:
        return backend.template
    if chat.template in FAMILIES:
        return ChatTemplate.of_family(chat.template)
    return ChatTemplate.from_text("the model's template", chat.template, backend.template.tokens)


def constraint_of(chat: Chat, template: ChatTemplate | None, prompt: str) -> Constraint | None:
    """What ``chat`` constrains its answer to, for ``template`` (None: a raw prompt)."""
    return from_request(
        format=chat.format,
        grammar=chat.grammar,
        tools=chat.tools,
        tool_choice=chat.tool_choice,
        reasoning=template.reasoning if template is not None else None,
        reasoning_opened=template is not None and OutputSplitter.reasoning_opened(template, prompt),
        tool_format=template.tool_calls if template is not None else None,
    )


def embed_inputs(backend: Backend, inputs: Sequence[str | list[int]], truncate: bool) -> list[Sequence[int] | str]:
    """Each input as ``backend`` embeds it: texts tokenized (raw text: no template, the
    tokenizer's own BOS rule), token ids checked against the vocabulary, each cut to the
    context when ``truncate`` (its first tokens kept, as Ollama and llama.cpp do) or else
    refused (ContextOverflow). A backend without a tokenizer of its own gets the text, cut
    to fit the context by its bound on the text's tokens (``count_tokens``: UTF-8 bytes + 2)."""
    facts = backend.describe()
    context, vocabulary = int(facts["context_length"]), facts.get("vocab_size")
    out: list[Sequence[int] | str] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = backend.tokenize(item)
            if ids is None:
                out.append(_bounded_text(item, backend.count_tokens(item) - len(item.encode()), context, truncate))
                continue
        else:
            ids = item
            if vocabulary and not all(0 <= t < vocabulary for t in ids):
                raise WireError(ErrorCode.INVALID_FIELD, f"input[{i}] holds a token id outside the vocabulary of {vocabulary}", field="input")
        if not ids:
            raise WireError(ErrorCode.INVALID_FIELD, f"input[{i}] has no tokens to average", field="input")
        if len(ids) > context:
            if not truncate:
                raise ContextOverflow(len(ids), context)
            ids = ids[:context]
        out.append(list(ids))
    return out


def _bounded_text(text: str, extra: int, context: int, truncate: bool) -> str:
    """``text`` if its bound on tokens (UTF-8 bytes + ``extra``) fits ``context``, else cut
    to fit (or ContextOverflow)."""
    data = text.encode()
    if len(data) + extra <= context:
        return text
    if not truncate:
        raise ContextOverflow(len(data) + extra, context, bound=f"its UTF-8 bytes + {extra}, without the model's tokenizer")
    return data[: max(1, context - extra)].decode(errors="ignore")


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` L2-normalised (a zero vector stays zero)."""
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    return (vector / norm).astype(np.float32) if norm > 0 else vector


class ModelWorker:
    def __init__(self, backend: Backend, outbox: Outbox, config: DaemonConfig):
        self.backend = backend
        self.outbox = outbox
        # Named once: a worker serves one loaded model for its life (a reload that changes it
        # starts another worker), and the summary is still asked for while the backend closes.
        self.model_label = f"{backend.describe().get('name', '?')} on {backend.kind}"
        self.max_queue = config.max_queue
        self.max_batch = min(config.max_batch, backend.max_batch)
        self._build_max_wait = config.build_max_wait_ms / 1000
        self.caches: PromptCaches | None = None
        self.counters = Counters()
        self.last_error: str | None = None
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # the worker waits on it
        self._prompts_due = threading.Condition(lock)  # the prompt thread waits on it
        # Guarded by the lock: what waits, what runs (written by the worker), what is asked for.
        self._waiting: list[Generation] = []  # in arrival order
        self._running: list[_Running] = []
        self._opening: Generation | None = None  # being started (its prefix chosen)
        self._builds: deque[BinaryCacheBuild] = deque()
        self._build: BinaryCacheBuild | None = None  # the one under way
        self._prompt_jobs: deque[Generation | _PromptJob] = deque()  # for the prompt thread, in order
        self._embeds: deque[EmbedJob] = deque()  # prepared, for the worker, in order
        self._embedding: EmbedJob | None = None  # the one under way
        self._embeds_preparing = 0  # on the prompt thread, not yet in _embeds
        self._turns = Turns()  # by Generation.turn: served when admitted
        self._accepting = True
        self._stopping = False
        self._others_generating = False  # another model's generations run: builds wait for them
        self.last_progress = time.monotonic()
        self._call_ids = itertools.count()  # tool calls' ids, unique while the daemon runs
        backend.heartbeat = self._heartbeat
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._prompt_thread = threading.Thread(target=self._prepare_prompts, name="prompts", daemon=True)

    @property
    def pid(self) -> int:
        """The process that runs the model: the daemon's (``daemon.runners = "thread"``)."""
        return os.getpid()

    # -- called from the socket loop (or the cache watcher) ----------------------

    def configure(self, config: DaemonConfig) -> None:
        """Apply a reloaded [daemon] section (queue, batch and build limits; requests already queued stay)."""
        with self._cond:
            self.max_queue = config.max_queue
            self.max_batch = min(config.max_batch, self.backend.max_batch)
            self._build_max_wait = config.build_max_wait_ms / 1000

    def start(self) -> None:
        self._thread.start()
        self._prompt_thread.start()

    def submit(self, gen: Generation) -> int:
        """Queue a generation (its prompt is prepared while it waits); return how many
        generations are ahead of it."""
        with self._cond:
            if not self._accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise WireError(ErrorCode.QUEUE_FULL, f"{len(self._waiting)} requests are waiting; the limit is {self.max_queue}")
            self._waiting.append(gen)
            self._prompt_jobs.append(gen)
            self._prompts_due.notify()
            self._announce_positions()
            assert gen.position is not None
            return gen.position

    def with_prompts(self, work: Callable[[Backend], T]) -> Future[T]:
        """``work(backend)`` on the prompt thread, in turn with the generations' prompts: work
        on prompts (rendering, tokenizing: seconds for a long text) never runs on the socket
        loop. The future has its result or its exception."""
        job = _PromptJob(work, Future())
        with self._cond:
            if not self._accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            self._prompt_jobs.append(job)
            self._prompts_due.notify()
        return job.future

    def embed(self, job: EmbedJob) -> None:
        """Queue an embed request: tokenized on the prompt thread, then run on the worker;
        ``job.future`` gets the result map or the WireError."""
        with self._cond:
            if not self._accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            if len(self._embeds) + len(self._waiting) >= self.max_queue:
                raise WireError(ErrorCode.QUEUE_FULL, f"{len(self._embeds) + len(self._waiting)} requests are waiting; the limit is {self.max_queue}")
            self._embeds_preparing += 1
        prepared = self.with_prompts(lambda backend: self._prepare_embed(job, backend))

        def failed(done: Future) -> None:
            if done.cancelled():  # never ran
                with self._cond:
                    self._embeds_preparing -= 1
                job.future.cancel()
            elif done.exception() is not None:
                job.future.set_exception(self._embed_error(done.exception()))

        prepared.add_done_callback(failed)

    def schedule_build(self, name: str) -> None:
        with self._cond:
            if any(job.name == name for job in self._builds):
                return
            self._builds.append(BinaryCacheBuild(name))
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
            if self._build is not None and self._build.owner is gen:
                self.backend.abort()  # the build of its prefix, which no one else waits for
        if state == "queued":
            self.counters.cancelled += 1
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=reason, **NO_OUTPUT)
        return state

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def activity(self) -> dict[str, Any]:
        with self._cond:
            building = self._build.name if self._build is not None else None
            return {
                "running": "generate" if self._running else ("cache_build" if building else ("embed" if self._embedding else None)),
                "queued": len(self._waiting),
                "builds_queued": len(self._builds),
                "building": building,
                "embeds": self._embeds_preparing + len(self._embeds) + (self._embedding is not None),
            }

    def busy(self) -> bool:
        """Anything to do or under way (what keeps its model loaded): requests it answers, cache builds."""
        with self._cond:
            return self.answering() or bool(self._builds or self._build)

    def answering(self) -> bool:
        """Requests given to it and not answered yet: generations, embed requests from their
        preparation on, prompt jobs (what a model a reload replaced finishes before it goes)."""
        with self._cond:
            return bool(self._running or self._waiting or self._opening or self._embeds_preparing or self._embeds
                        or self._embedding or self._prompt_jobs)

    def summary(self) -> dict[str, Any]:
        """What the status line shows: activity, cache states, generations served, the last error."""
        states = self.caches.counts() if self.caches is not None else {}
        with self._cond:
            last_error, completed = self.last_error, self.counters.completed
        return {"model": self.model_label, "activity": self.activity(), "states": states,
                "completed": completed, "last_error": last_error}

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
        """Idle, or made progress (a step, a prefill chunk) in the last ``within`` seconds."""
        with self._cond:
            busy = bool(self._running) or self._opening is not None or self._build is not None
        alive = self._thread.is_alive() and self._prompt_thread.is_alive()
        return alive and (not busy or time.monotonic() - self.last_progress < within)

    def shutdown(self) -> list[Generation]:
        """Stop taking work, cut every running generation short ("shutting down"), return the
        queued ones (not run). Prompt jobs not started are cancelled."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            dropped, self._waiting = self._waiting, []
            self._builds.clear()
            jobs, self._prompt_jobs = self._prompt_jobs, deque()
            embeds, self._embeds = self._embeds, deque()
            for running in self._running:
                running.gen.cancel_reason = "shutting down"
                running.gen.cancelled.set()
                running.run.abort()
            if self._opening is not None:
                self._opening.cancel_reason = "shutting down"
                self._opening.cancelled.set()
            self.backend.abort()  # a build, or a generation in one native call
            self._cond.notify()
            self._prompts_due.notify()
        for job in jobs:
            if isinstance(job, _PromptJob):
                job.future.cancel()  # answered "shutting down"
        for embed in embeds:
            embed.future.cancel()
        return dropped

    def join(self, timeout: float) -> bool:
        """Wait for the worker to stop (it then closes the backend); False if it did not in time:
        a native call still runs, and the backend stays open (the process ends around it)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the order of the queue (lock held) -----------------------------------------------

    def _fair_order(self) -> list[Generation]:
        """Waiting generations in the order they will start: clients take turns (the one
        admitted least recently first, a new one before all), each client's own in arrival order."""
        return self._turns.order(self._waiting, lambda gen: gen.turn, lambda gen: gen.received)

    def _admissible(self) -> list[Generation]:
        """Waiting generations that may start now, in order: prepared, and not waiting for the
        build under way (its owner, and those whose prompt starts with the text it builds:
        they would prefill the same tokens beside it)."""
        build = self._build
        return [
            gen for gen in self._fair_order()
            if gen.prepared_for is self.backend and (build is None or gen is not build.owner and gen.prefix_cache != build.name)
        ]

    def _announce_positions(self) -> None:
        """Tell every waiting generation whose position changed its new one (``queued``), and
        whether it waits for the cache build under way (``cache_build``: it holds no place in
        the batch meanwhile, so the scheduler gives the runner another)."""
        ahead = len(self._running) + (self._opening is not None)
        build = self._build
        for gen in self._fair_order():
            waits = build.name if build is not None and (gen is build.owner or gen.prefix_cache == build.name) else None
            if gen.position != ahead or gen.waits_for_build != waits:
                gen.position, gen.waits_for_build = ahead, waits
                if ahead or waits:  # first in line and waiting for no build: it starts as soon as it is prepared
                    self.outbox.stream(gen, "queued", position=ahead, **({"cache_build": waits} if waits else {}))
            ahead += 1

    def _generations_due(self) -> bool:
        with self._cond:
            return bool(self._running) or not self._stopping and bool(self._admissible())

    # -- the prompt thread ---------------------------------------------------------

    def _prepare_prompts(self) -> None:
        """Prepare each waiting generation's prompt, and run the other prompt jobs, in arrival order."""
        backend = self.backend
        while True:
            with self._cond:
                while not self._prompt_jobs and not self._stopping:
                    self._prompts_due.wait()
                if self._stopping:
                    return
                job = self._prompt_jobs.popleft()
                if isinstance(job, Generation) and job not in self._waiting:  # cancelled meanwhile
                    continue
            try:
                if isinstance(job, _PromptJob):
                    if job.future.set_running_or_notify_cancel():
                        self._answer(job, backend)
                else:
                    self._prepare(job, backend)
            except Exception:  # the thread must outlive any one job
                log.exception("preparing a prompt failed")

    @staticmethod
    def _answer(job: _PromptJob, backend: Backend) -> None:
        try:
            job.future.set_result(job.work(backend))
        except BaseException as exc:  # the socket loop answers it as an error
            job.future.set_exception(exc)

    def _prepare(self, gen: Generation, backend: Backend) -> None:
        """Render and tokenize ``gen``'s prompt for ``backend``; the worker may then admit it."""
        assert gen.chat is not None
        try:
            prompt, output, constraint = prepared_prompt(backend, gen.chat)
            ids = backend.tokenize(prompt)
            prefix_cache = self.caches.longest_prefix(prompt, gen.cache) if gen.use_cache and self.caches is not None else None
        except Exception as exc:
            with self._cond:
                waiting = gen in self._waiting
                if waiting:
                    self._waiting.remove(gen)
                    self._announce_positions()
            if waiting:  # else cancelled meanwhile
                self._fail(gen, self._wire_error(exc, gen))
            return
        with self._cond:
            if gen in self._waiting:
                gen.prompt, gen.output, gen.prompt_ids, gen.prepared_for = prompt, output, ids, backend
                gen.prefix_cache = prefix_cache
                gen.params = replace(gen.params, constraint=constraint)
                self._announce_positions()  # it may wait for the build under way
                self._cond.notify()

    # -- the worker thread ---------------------------------------------------------

    def _heartbeat(self) -> None:
        self.last_progress = time.monotonic()

    def _run(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                try:
                    job()
                except Exception:  # the worker must outlive any one job
                    log.exception("model worker job failed")
        finally:
            self._close_backend()

    def _next_job(self) -> Callable[[], None] | None:
        """What to do next (None: stop): a build that waited past its bound, the generations
        due, a build; else wait."""
        with self._cond:
            while True:
                if self._stopping and not self._running:
                    return None
                due = self._generations_due()
                if due and self._builds and self._builds[0].overdue(self._build_max_wait):
                    return self._build_next
                if self._embeds and not self._stopping:
                    return self._embed_next
                if due:
                    return self._serve_step
                if self._builds and (not self._others_generating or self._builds[0].overdue(self._build_max_wait)):
                    return self._build_next
                # Another model's generations first: the build waits until they end or it is overdue.
                self._cond.wait(self._until_overdue(self._builds[0]) if self._builds else None)

    def _close_backend(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("closing the model failed")

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
        """Start waiting generations while there is room; then tell the others where they are.
        One whose prefix's cache is due has it built first, when nothing else runs (a build
        would hold up the running streams) and no build is under way (builds never nest): it
        waits meanwhile, and arrivals run in the build's pauses."""
        built_for: set[int] = set()
        while True:
            with self._cond:
                admissible = self._admissible()
                if self._stopping or len(self._running) >= self.max_batch or not admissible:
                    self._announce_positions()
                    return
                gen = admissible[0]
                may_build = not self._running and self._build is None and id(gen) not in built_for
            if may_build and (name := self._due_build(gen)) is not None:
                built_for.add(id(gen))
                self._run_build(BinaryCacheBuild(name, owner=gen))
                continue  # it is admitted in its turn, its cache ready (or failed)
            with self._cond:
                if gen not in self._waiting:  # cancelled meanwhile
                    continue
                self._waiting.remove(gen)
                self._opening = gen
                self._turns.served(gen.turn)
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

    def _due_build(self, gen: Generation) -> str | None:
        """The text cache to build before ``gen`` prefills the same tokens itself."""
        if not gen.use_cache or self.caches is None:
            return None
        name = self.caches.due_build(gen.prompt, gen.cache)
        if name is not None:
            with self._cond:
                queued = next((job for job in self._builds if job.name == name), None)
                if queued is not None:
                    self._builds.remove(queued)  # built now
        return name

    def _open(self, gen: Generation) -> _Running | None:
        """Start a generation on the backend (its prefix chosen); None if it ended already."""
        started = gen.started = time.monotonic()
        self.counters.generations += 1
        self.outbox.stream(gen, "started", queue_ms=round((started - gen.received) * 1000, 2))
        output = gen.output
        assert output is not None
        opened: list[_Running] = []

        def sink(text: str) -> bool:
            if gen.cancelled.is_set():
                return False
            self._report_progress(opened[0])  # the last chunk's, before the text it led to
            self._send_output(gen, *output.feed(text), opened[0].run.take_logprobs())
            return True

        try:
            prefix = self._prefix(gen)
            if not gen.cancelled.is_set():
                opened.append(_Running(gen, self.backend.start(gen.prompt, gen.params, prefix, sink, ids=gen.prompt_ids), prefix))
        except Exception as exc:
            self._fail(gen, self._wire_error(exc, gen))
            return None
        if not opened:
            self.counters.cancelled += 1
            self.outbox.stream(gen, "done", finish_reason="cancelled", stats=None, cache=None, reason=gen.cancel_reason, **NO_OUTPUT)
            return None
        return opened[0]

    def _prefix(self, gen: Generation) -> PrefixState | None:
        """The prefix state ``gen`` restores, if any."""
        if not gen.use_cache or self.caches is None:
            return None
        prefix = self.caches.choose(gen.prompt, gen.cache, gen.prompt_ids)
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
        # Out of the batch before its client hears the end: a client's next request, which
        # may arrive at once (from a runner process, before this thread goes on), never counts
        # it ahead. Positions are told as the next ones are admitted (no transient ones).
        with self._cond:
            self._running.remove(running)
        try:
            if error is not None:
                self._fail(gen, error)
            else:
                self._done(gen, run, prefix)
        finally:
            self.backend.release(run)

    def _done(self, gen: Generation, run: Run, prefix: PrefixState | None) -> None:
        stats, output = run.stats, gen.output
        assert output is not None
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

    # -- builds ------------------------------------------------------------------------

    def _build_next(self) -> None:
        """The next queued build."""
        with self._cond:
            if not self._builds or self._stopping:
                return
            job = self._builds.popleft()
        self._run_build(job)

    def _run_build(self, job: BinaryCacheBuild) -> None:
        """Build ``job``'s cache; the generations due meanwhile run in its pauses."""
        assert self.caches is not None
        with self._cond:
            if self._stopping:  # its abort must not be forgotten
                return
            self._build = job
            self.backend.reset_abort()  # the build's own flag; generations have theirs
            self._announce_positions()
        self.backend.pause = self._pause
        self.caches.build(job.name, released=self._release_build)

    def _release_build(self) -> None:
        """The build has ended: generations no longer wait for it (before anyone hears its outcome)."""
        self.backend.pause = lambda: None
        with self._cond:
            self._build = None
            self._announce_positions()

    def _pause(self) -> None:
        """Between a build's prefill chunks: serve the generations due until none are, or until
        the build has waited ``build_max_wait_ms`` for its next chunk (one step at least).
        While another model generates, a build no request of this model waits for waits too
        (its chunks would take the cores from those generations), as long as that bound."""
        job = self._build
        assert job is not None
        job.waiting_since = time.monotonic()
        while True:
            if self._generations_due():
                self._serve_step()
            elif job.owner is None and not job.overdue(self._build_max_wait):
                with self._cond:
                    if not self._others_generating or self._stopping:
                        return
                    self._cond.wait(self._until_overdue(job))
                    self.last_progress = time.monotonic()  # waiting on purpose, not stuck
            else:
                return
            if job.overdue(self._build_max_wait):
                return

    def _until_overdue(self, job: BinaryCacheBuild) -> float:
        """Seconds until ``job`` has waited ``build_max_wait_ms`` (at most one: the wait is looked at again)."""
        return min(1.0, max(0.0, self._build_max_wait - (time.monotonic() - job.waiting_since)))

    def others_generating(self, generating: bool) -> None:
        """Another model's generations run (the scheduler says so): this model's cache builds
        wait for them, up to ``build_max_wait_ms`` at a time."""
        with self._cond:
            self._others_generating = generating
            self._cond.notify_all()

    # -- embeddings --------------------------------------------------------------------

    def _prepare_embed(self, job: EmbedJob, backend: Backend) -> None:
        """Prompt thread: tokenize ``job``'s texts for ``backend``, cut them to its context (or
        refuse them: ``context_overflow``), check token ids; then queue it for the worker."""
        try:
            job.prepared = embed_inputs(backend, job.inputs, job.truncate)
        except BaseException:
            with self._cond:
                self._embeds_preparing -= 1
            raise
        with self._cond:
            self._embeds_preparing -= 1
            if not self._accepting:
                job.future.cancel()
                return
            self._embeds.append(job)
            self._cond.notify()

    def _embed_next(self) -> None:
        """Run the next embed request: between its forward passes, the generations due step."""
        with self._cond:
            if not self._embeds:
                return
            job = self._embedding = self._embeds.popleft()
            backend = self.backend
        started = time.monotonic()

        def between() -> None:
            self._heartbeat()
            if self._stopping:
                raise EmbedStopped
            if self._generations_due():
                self._serve_step()

        try:
            assert job.prepared is not None
            pooled = backend.embed(job.prepared, between)
        except Exception as exc:
            job.future.set_exception(self._embed_error(exc))
            return
        finally:
            with self._cond:
                self._embedding = None
        done = time.monotonic()
        vectors = [_unit(vector) if job.normalize else vector for vector, _ in pooled]
        counts = [count for _, count in pooled]
        job.future.set_result({
            "embeddings": [struct.pack(f"<{len(v)}f", *v.tolist()) for v in vectors],
            "dimensions": len(vectors[0]),
            "normalized": job.normalize,
            "prompt_tokens": counts,
            "total_tokens": sum(counts),
            "queue_ms": round((started - job.received) * 1000, 2),
            "compute_ms": round((done - started) * 1000, 2),
        })

    def _embed_error(self, exc: BaseException) -> BaseException:
        """The wire error an embed request's failure is answered with."""
        if isinstance(exc, (WireError, CancelledError)):
            return exc
        if isinstance(exc, EmbedStopped):
            return WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        if isinstance(exc, ContextOverflow):
            return WireError(ErrorCode.CONTEXT_OVERFLOW, str(exc), field="input", prompt_tokens=exc.prompt_tokens, context_length=exc.context_length)
        if isinstance(exc, BackendError):
            with self._cond:
                self.last_error = str(exc)
            return WireError(ErrorCode.BACKEND, str(exc), **({} if exc.runtime_code is None else {"runtime_code": exc.runtime_code}))
        log.error("an embed request failed", exc_info=exc)
        return WireError(ErrorCode.INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}")

    # -- messages -------------------------------------------------------------------

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
        if isinstance(exc, RenderError):  # the chat template refused the request's chat
            return WireError(ErrorCode.INVALID_FIELD, str(exc), field="messages")
        if isinstance(exc, CapabilityMissing):  # the model that runs it lacks tools or thinking
            return WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field, capability=exc.capability)
        if isinstance(exc, ConstraintError):  # found against the model's template or vocabulary, or its backend cannot
            return WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field)
        if isinstance(exc, ContextOverflow):
            return WireError(ErrorCode.CONTEXT_OVERFLOW, str(exc), prompt_tokens=exc.prompt_tokens, context_length=exc.context_length)
        if isinstance(exc, BackendError):
            return WireError(ErrorCode.BACKEND, str(exc), **({} if exc.runtime_code is None else {"runtime_code": exc.runtime_code}))
        log.error("generation %r failed", gen.request_id, exc_info=exc)
        return WireError(ErrorCode.INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}")

    def _fail(self, gen: Generation, error: WireError) -> None:
        with self._cond:  # the worker and its prompt thread both fail generations
            self.counters.errors += 1
            if error.code in (ErrorCode.BACKEND, ErrorCode.INTERNAL):
                self.last_error = error.message
        self.outbox.stream(gen, "error", error=error.to_wire())
