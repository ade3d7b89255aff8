"""The runner process: one loaded weights file's backend, ModelWorker and PromptCaches.

The daemon starts it (``python -m rkllmd.runner FD``) with one end of a socketpair and
sends it the configuration that loads its model. It loads the model, then serves the
daemon's messages: generations and embed requests go to its worker, whose outbox sends each
stream message back; cache and status calls run on a thread of their own (a cache check
reads and hashes files) and are answered by call id.

It holds nothing of the daemon's but that socket: no ZeroMQ socket, no systemd notify
socket. It ignores SIGTERM, SIGINT and SIGHUP (the daemon stops it, after cutting its
generations short with an answer) and dies with the daemon (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..backends import choose
from ..backends.base import Backend, BackendError
from ..caches.binary import BinaryStore
from ..caches.manager import PromptCaches
from ..caches.text import TextStore
from ..config import Config
from ..outbox import Generation, join_token, token_wake_due
from ..paths import cache_dirs, kernels_dir, weights_dir
from ..protocol import WireError
from ..service import enable_faulthandler
from ..worker import EmbedJob, ModelWorker
from .channel import Channel, ChannelClosed
from .portable import BackendFacts, portable_error

log = logging.getLogger("rkllmd.runner")

_PR_SET_PDEATHSIG = 1
#: How long a stopping runner waits for its worker's last call before it exits anyway.
STOP_JOIN_S = 30.0


class SummaryPusher:
    """Sends the worker's summary (the status line's facts) to the daemon whenever it may have
    changed: the daemon's socket loop reads it after every wake, and must never wait for a
    runner to answer. Computed on a thread of its own, with no other lock held."""

    def __init__(self, channel: Channel):
        self._channel = channel
        self._due = threading.Event()
        self.worker: ModelWorker | None = None

    def changed(self) -> None:
        self._due.set()

    def start(self, worker: ModelWorker) -> None:
        self.worker = worker
        self._due.set()
        threading.Thread(target=self._run, name="runner-summary", daemon=True).start()

    def _run(self) -> None:
        assert self.worker is not None
        sent = None
        while True:
            self._due.wait()
            self._due.clear()
            try:
                summary = self.worker.summary()
                if summary != sent:
                    self._channel.send(("summary", summary))
                    sent = summary
            except ChannelClosed:
                return
            except Exception:  # the next change tries again
                log.exception("summing up the worker's state failed")


class ForwardingOutbox:
    """The worker's outbox in a runner: stream messages go to the daemon, whose own Outbox
    joins and paces them for the client. Token text is paced here too, as the daemon paces
    it (``token_wake_due``): text in between waits, joined, for the next due piece or the
    stream's next other message. A frame per token, sent by the worker between two decode
    steps, cost 140 us of the 400 us between them (pickling and sending from memory: a
    step's weights have passed through every cache), and woke the daemon's threads while
    the next step's products ran. ``request_id`` of a runner's generation is the daemon's
    number for it."""

    def __init__(self, channel: Channel, summary: SummaryPusher):
        self._channel = channel
        self._summary = summary
        self._lock = threading.Lock()
        self.generations: dict[int, Generation] = {}
        self._held: dict[int, dict[str, Any]] = {}  # token text not sent yet, by request_id

    def stream(self, gen: Generation, type_: str, **fields: Any) -> None:
        with self._lock:  # the worker, its prompt thread and cancels all end streams
            if gen.finished:
                return
            gen.finished = type_ in ("done", "error")
            if gen.finished:
                self.generations.pop(gen.request_id, None)
            held = self._held.pop(gen.request_id, None)
            if type_ == "token":
                if held is not None:
                    join_token(held, fields)
                    fields, held = held, None
                if not token_wake_due(gen):
                    self._held[gen.request_id] = fields
                    return
        if held is not None:  # before the message that ends or moves the stream
            self._channel.send(("stream", gen.request_id, "token", held))
        self._channel.send(("stream", gen.request_id, type_, fields))
        if type_ != "token":  # a generation queued, started or ended
            self._summary.changed()


def load(config: Config, progress: Callable[[str], None]) -> tuple[Backend, str]:
    backend, reason = choose(config, weights_dir=weights_dir(config), kernels_dir=kernels_dir(config))
    backend.load(progress=progress)
    return backend, reason


class Runner:
    def __init__(self, channel: Channel, config: Config):
        self.channel = channel
        self.config = config
        self.summary = SummaryPusher(channel)
        self.outbox = ForwardingOutbox(channel, self.summary)
        self.calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-calls")
        self.worker: ModelWorker
        self.caches: PromptCaches

    def load(self) -> bool:
        """Load the model and start serving it; False (the daemon told why) if it cannot be."""
        try:
            backend, reason = load(self.config, lambda what: self.channel.send(("progress", what)))
        except (BackendError, OSError) as exc:
            self.channel.send(("failed", str(exc)))
            return False
        worker = self.worker = ModelWorker(backend, self.outbox, self.config.daemon)
        text_dir, binary_dir = cache_dirs(self.config)
        self.caches = worker.caches = PromptCaches(
            TextStore(text_dir, self.config.cache.max_text_bytes),
            BinaryStore(binary_dir, backend.identity()),
            backend,
            memory_budget=self.config.cache.memory_budget_mb << 20,
            schedule_build=worker.schedule_build,
            on_change=self._cache_changed,
            on_stored=lambda: self.channel.send(("stored",)),
            keep_conversations=self.config.cache.conversations,
        )
        self.caches.scan()
        worker.start()
        self.channel.send(("ready", BackendFacts.of(backend), reason, str(self.caches.binaries.folder), worker.summary()))
        self.summary.start(worker)
        return True

    def _cache_changed(self, name: str) -> None:
        self.channel.send(("changed", name))
        self.summary.changed()

    def serve(self) -> None:
        """Serve the daemon's messages until it tells the runner to stop, or goes."""
        while True:
            try:
                message = self.channel.receive()
            except ChannelClosed:
                log.info("the daemon is gone; exiting")
                os._exit(0)
            getattr(self, "_on_" + message[0])(*message[1:])

    # -- the daemon's messages ------------------------------------------------------------

    def _on_submit(self, number: int, fields: dict[str, Any]) -> None:
        gen = Generation(request_id=number, **fields)
        self.outbox.generations[number] = gen
        try:
            self.worker.submit(gen)
        except WireError as exc:
            self.outbox.stream(gen, "error", error=exc.to_wire())

    def _on_others_generating(self, generating: bool) -> None:
        self.worker.others_generating(generating)

    def _on_cancel(self, number: int, reason: str) -> None:
        gen = self.outbox.generations.get(number)
        if gen is not None:
            self.worker.cancel(gen, reason)

    def _on_embed(self, number: int, inputs: list[Any], truncate: bool, normalize: bool, received: float) -> None:
        job = EmbedJob(inputs, truncate, normalize, Future(), received)
        job.future.add_done_callback(lambda done: self._answer("embedded", number, done))
        try:
            self.worker.embed(job)
        except WireError as exc:
            job.future.set_exception(exc)

    def _on_prompts(self, number: int, work: Callable[[Backend], Any]) -> None:
        try:
            self.worker.with_prompts(work).add_done_callback(lambda done: self._answer("reply", number, done))
        except WireError as exc:
            self.channel.send(("reply", number, False, portable_error(exc)))

    def _on_call(self, number: int, target: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The worker's and the backend's status calls at once (they take the worker's lock only
        briefly: the watchdog's health check must not wait behind a cache check); cache calls
        on their thread."""

        def call() -> Any:
            value = getattr({"worker": self.worker, "backend": self.worker.backend, "caches": self.caches}[target], method)
            return value(*args, **kwargs) if callable(value) else value

        if target != "caches":
            done: Future = Future()
            try:
                done.set_result(call())
            except Exception as exc:
                done.set_exception(exc)
            self._answer("reply", number, done)
        else:
            self.calls.submit(call).add_done_callback(lambda done: self._answer("reply", number, done))

    def _on_move(self, number: int, text_dir: str, max_text_bytes: int, binary_dir: str) -> None:
        def move() -> str:
            self.caches.move(TextStore(Path(text_dir), max_text_bytes), Path(binary_dir))
            return str(self.caches.binaries.folder)

        self.calls.submit(move).add_done_callback(lambda done: self._answer("reply", number, done))

    def _on_shutdown(self, number: int) -> None:
        """Stop: the queued generations go back to the daemon (it answers them), the running
        ones are cut short; exit once the worker's last call returned."""
        dropped = self.worker.shutdown()
        for gen in dropped:
            self.outbox.generations.pop(gen.request_id, None)
        self.channel.send(("reply", number, True, [gen.request_id for gen in dropped]))
        threading.Thread(target=self._exit, name="runner-exit", daemon=True).start()

    def _exit(self) -> None:
        if not self.worker.join(STOP_JOIN_S):
            log.error("the worker did not stop within %g s; exiting around its call", STOP_JOIN_S)
        else:
            self.caches.binaries.release()
        logging.shutdown()
        os._exit(0)

    def _answer(self, kind: str, number: int, done: Future) -> None:
        if done.cancelled():
            self.channel.send((kind, number, False, ("cancelled",)))
        elif done.exception() is not None:
            self.channel.send((kind, number, False, portable_error(done.exception())))
        else:
            self.channel.send((kind, number, True, done.result()))


def _die_with(parent: int) -> None:
    """SIGKILL when the daemon ends: no runner outlives it. (The kernel sends it when the
    thread that started the runner ends; the daemon starts them all from one thread that
    lives as long as it does.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the prctl
        os._exit(0)


def main(argv: list[str]) -> int:
    channel = Channel(socket.socket(fileno=int(argv[1])))
    spec = channel.receive()
    _die_with(spec["parent"])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    enable_faulthandler()
    config: Config = spec["config"]
    # The daemon's format (rkllmd/cli.py's LOG_FORMAT), each line saying whose runner wrote it.
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, config.daemon.log_level.upper()),
                        format=f"%(levelname)s %(name)s: %(message)s (runner of {spec['name']}, pid {os.getpid()})")
    logging.getLogger("watchdog").setLevel(max(logging.getLogger().level, logging.INFO))  # as the daemon's apply_log_level
    runner = Runner(channel, config)
    if not runner.load():
        return 1
    runner.serve()
    return 0
