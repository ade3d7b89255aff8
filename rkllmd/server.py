"""The socket loop: receives requests, dispatches them to commands, sends their replies.

Everything that touches the ZeroMQ socket happens on this one thread, and nothing on
it waits for the model or the disk: model work is queued on the worker, file work on
the commands' disk thread. Requests are checked here (envelope, version, op, fields
against the protocol schema) and every failure becomes a wire error at one place,
``_error_message``. Clients and their flow control live in connections.py, our paths'
upkeep in pathkeeper.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import zmq

from . import commands
from .commands import status
from .commands.context import Context, Deferred, Request
from .connections import Connections
from .endpoint import Endpoint
from .models.registry import Resolved
from .outbox import Outbox
from .pathkeeper import PathKeeper
from .protocol import MAX_ID_CHARS, PROTOCOL_VERSION, ErrorCode, WireError, error_reply, reply, unpack
from .schema import OPERATIONS, parse
from .templates import RenderError
from .service import ServiceNotifier

log = logging.getLogger(__name__)

#: Messages read in one go before the outbox gets a turn.
RECEIVE_BATCH = 256


class Daemon:
    def __init__(self, ctx: Context, endpoint: Endpoint, connections: Connections, outbox: Outbox, notifier: ServiceNotifier):
        self.ctx = ctx
        self.endpoint = endpoint
        self.connections = connections
        self.outbox = outbox
        self.notifier = notifier
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.paths = PathKeeper(endpoint, connections, ctx.caches, ctx.config.cache, ctx.disk, self._signal_w, self._fail,
                                refresh=ctx.pool.refresh, rescan=ctx.pool.rescan)
        self._deferred: dict[Deferred, None] = {}  # answers with a deadline, in arrival order
        self._status_sent = ""
        self.exit_status = 0  # 1 when the daemon stops because it can no longer serve
        self._stop = False
        self._reload_requested = False
        self.reload_handler: Callable[[], None] | None = None
        self._soon: deque[Callable[[], None]] = deque()  # handed to the loop by other threads (call_soon)

    # -- life cycle --------------------------------------------------------------

    def bind(self) -> None:
        """Bind the claimed path; after this, clients can connect."""
        self.paths.bind()
        log.info("listening on %s", self.endpoint.url)

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if not self._stop:
            log.info("received %s: shutting down", signal.Signals(signum).name)
        self._stop = True

    def _on_reload_signal(self, signum: int, frame: Any) -> None:
        self._reload_requested = True

    def call_soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the socket loop, from any thread: what changes the context the
        commands read (a reload's new default model) changes between two requests."""
        self._soon.append(work)
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._signal_w, b"c")

    def _run_soon(self) -> None:
        while self._soon:
            try:
                self._soon.popleft()()
            except Exception:  # the loop must outlive it
                log.exception("work handed to the socket loop failed")

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then shut down cleanly."""
        self.paths.start()
        self.paths.watch()
        poller = zmq.Poller()
        for pollable in self.connections.pollables():
            poller.register(pollable, zmq.POLLIN)
        poller.register(self.outbox.fileno(), zmq.POLLIN)
        poller.register(self._signal_r, zmq.POLLIN)
        while not self._stop:
            timeout = self._poll_timeout()
            events = dict(poller.poll(None if timeout is None else max(1, int(timeout * 1000))))
            if self._signal_r in events:
                self._drain_signal_pipe()
            self._run_soon()  # before a reload: one that failed to load a model has restored its settings
            if self._reload_requested:
                self._reload_requested = False
                if self.reload_handler is not None:
                    self.reload_handler()
            self.connections.note_disconnections()
            if self.connections.router in events:
                self._receive()
            self._expire_deferred()
            self.connections.flush()
            self.paths.check()
            self._update_status()
        self._shutdown()

    def _drain_signal_pipe(self) -> None:
        try:
            while os.read(self._signal_r, 512):
                pass
        except BlockingIOError:
            pass

    def _poll_timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = [answer.deadline for answer in self._deferred]
        if (check := self.paths.next_check()) is not None:
            deadlines.append(check)
        if (retry := self.connections.retry_after()) is not None:
            deadlines.append(now + retry)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _fail(self, message: str) -> None:
        """Stop serving, cleanly, with a non-zero exit status (systemd then restarts us)."""
        log.error("%s; stopping", message)
        self.exit_status = 1
        self._stop = True

    def _shutdown(self) -> None:
        self._run_soon()  # a reload's new default model, loaded meanwhile, is then stopped with the others
        self.notifier.stopping()
        self.notifier.status("stopping: aborting the running generation")
        stopping = WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        loaded = self.ctx.pool.in_memory()
        dropped = self.ctx.scheduler.shutdown()
        self.ctx.pool.shutdown()
        for model in loaded:
            dropped.extend(model.worker.shutdown())
        for gen in dropped:
            self.outbox.stream(gen, "error", error=stopping.to_wire())
        stop_timeout = self.ctx.config.daemon.stop_timeout
        deadline = time.monotonic() + stop_timeout
        for model in loaded:
            if not model.worker.join(timeout=max(0.0, deadline - time.monotonic())):
                # It closes the model itself once its call returns; meanwhile the model stays open
                # (freeing it under a running native call would be a use after free).
                log.error("the worker of model %s did not stop within %g s (a call into the model still runs); "
                          "exiting without releasing the model", model.name, stop_timeout)
        self.ctx.disk.shutdown(wait=False, cancel_futures=True)  # cancelled answers say "shutting down"
        self.ctx.inquiries.shutdown()
        for answer in self._deferred:
            answer.resolve(stopping)
        self.connections.flush()
        self.connections.close()
        self.paths.stop()
        self.endpoint.release()
        log.info("stopped")

    # -- receiving and answering -------------------------------------------------------

    def _receive(self) -> None:
        for _ in range(RECEIVE_BATCH):
            message = self.connections.receive()
            if message is None:
                return
            identity, body = message
            request_id = None
            try:
                if len(body) != 1:
                    raise WireError(ErrorCode.MALFORMED, f"expected one frame per message, got {len(body)}")
                request = unpack(body[0])
                request_id = _request_id(request)
                result = self._dispatch(identity, request_id, request)
            except Exception as exc:
                self.connections.send(identity, _error_message(request_id, exc))
                continue
            self._reply(identity, request_id, result)

    def _dispatch(self, identity: bytes, request_id: Any, request: dict[str, Any]) -> commands.Reply:
        version = request.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
            raise WireError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}", supported=[PROTOCOL_VERSION])
        op = request.get("op")
        command = commands.REGISTRY.get(op) if isinstance(op, str) else None
        if command is None:
            raise WireError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}", known=sorted(commands.REGISTRY))
        if self._stop:
            raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        operation, setting, model = OPERATIONS[op], self.ctx.config.__getitem__, None
        name = request.get("model")
        if any(f.name == "model" for f in operation.fields) and (name is None or isinstance(name, str)):
            model = self.ctx.registry.resolve(name)  # not_found before anything else is checked, as Ollama answers
            setting = model_settings(model, setting)
        args = parse(operation, request, setting)
        return command(self.ctx, Request(identity, request_id, args, self.connections.client_name(identity), model))

    def _reply(self, identity: bytes, request_id: Any, result: commands.Reply) -> None:
        """A result map now, or a Future's outcome when it has one (None: the command streams)."""
        if isinstance(result, Future):
            if isinstance(result, Deferred):
                self._deferred[result] = None
            result.add_done_callback(lambda done: self.outbox.post(identity, _outcome_message(request_id, done)))
        elif result is not None:
            self.connections.send(identity, reply(request_id, "result", result=result))

    def _expire_deferred(self) -> None:
        now = time.monotonic()
        for answer in list(self._deferred):
            if not answer.done() and now >= answer.deadline:
                answer.expire()
            if answer.done():
                del self._deferred[answer]

    # -- status ---------------------------------------------------------------------------

    def _update_status(self) -> None:
        if not self.notifier.enabled:
            return
        line = status.line(self.ctx)
        if line != self._status_sent:
            self._status_sent = line
            self.notifier.status(line)


def model_settings(model: Resolved, setting: Callable[[str], Any]) -> Callable[[str], Any]:
    """The configuration's settings with ``model``'s parameters in place of the sampling defaults."""
    def lookup(key: str) -> Any:
        section, name = key.split(".", 1)
        return model.parameters[name] if section == "sampling" and name in model.parameters else setting(key)

    return lookup


def _outcome_message(request_id: Any, done: Future) -> dict[str, Any]:
    """The reply for a finished Future (on whichever thread finished it)."""
    if done.cancelled():
        return error_reply(request_id, WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"))
    if done.exception() is not None:
        return _error_message(request_id, done.exception())
    return reply(request_id, "result", result=done.result())


def _error_message(request_id: Any, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, RenderError):  # the chat template refused the request's chat
        exc = WireError(ErrorCode.INVALID_FIELD, str(exc), field="messages")
    if not isinstance(exc, WireError):
        log.error("request %r failed", request_id, exc_info=exc)
        exc = WireError(ErrorCode.INTERNAL, f"internal error: {exc.__class__.__name__}")
    return error_reply(request_id, exc)


def _request_id(request: Any) -> Any:
    if not isinstance(request, dict):
        raise WireError(ErrorCode.MALFORMED, f"a message must be a map, not {type(request).__name__}")
    request_id = request.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise WireError(ErrorCode.INVALID_FIELD, "field 'id' must be a string or an integer", field="id")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        raise WireError(ErrorCode.INVALID_FIELD, f"field 'id' is longer than {MAX_ID_CHARS}", field="id")
    if isinstance(request_id, int) and not -(2**63) <= request_id < 2**64:
        raise WireError(ErrorCode.INVALID_FIELD, "field 'id' is out of range", field="id")
    return request_id
