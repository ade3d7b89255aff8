"""The socket loop: receives requests, dispatches them to commands, sends what the worker produced.

Everything that touches the ZeroMQ socket happens on this one thread. Requests are
checked here (envelope, version, op, fields) and turned into wire errors at one
place, ``_dispatch``; model work is only ever queued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import __version__, commands
from .backends.base import Backend
from .caches.atomic import TEXT_DIR_MODE, make_dirs
from .caches.manager import CacheManager
from .caches.watcher import TextFolderWatcher
from .commands.cache_wait import CacheWaiter
from .config import Config
from .endpoint import Endpoint, EndpointError
from .outbox import Generation, Outbox
from .pathwatch import PathWatch
from .protocol import MAX_ID_CHARS, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ErrorCode, WireError, error_reply, pack, reply, unpack
from .service import ServiceNotifier
from .worker import ModelWorker

log = logging.getLogger(__name__)

#: Larger messages are not even read: libzmq drops the connection (see docs/protocol.md).
HARD_MESSAGE_LIMIT = 16 * MAX_MESSAGE_BYTES
#: How often a stream that a client is not reading is retried.
BLOCKED_RETRY_S = 0.05
#: ... and how soon when the last retry made progress (the client is reading again).
PROGRESS_RETRY_S = 0.001

# A client that stops reading must be noticed by a failing send, not after the daemon
# has generated hundreds of tokens into buffers: "no progress for slow_client_timeout"
# can only start then. Between the socket loop and a stopped client sit ZeroMQ's queue
# (SNDHWM messages; libzmq's default is 1000) and the kernel's send buffer of the
# connection (Linux default ~208 KiB: about 270 small messages, as each takes a buffer
# of its own). Both are made small, so a stopped reader is detected after a few dozen
# messages; a reading client never comes near either limit (replies that meet a full
# queue are held here, in order, and retried).
#: Messages ZeroMQ queues for one client.
SEND_HWM = 16
#: SO_SNDBUF of each client's connection (the kernel doubles it).
CONNECTION_SNDBUF = 8192
#: Bytes of replies (not generation text, which is coalesced) held for one client that is not
#: reading, counting HELD_OVERHEAD for each; more are dropped, and all after slow_client_timeout
#: without progress. A client may pipeline tens of thousands of small requests.
MAX_HELD_BYTES = 8 << 20
HELD_OVERHEAD = 128
#: listen(2) backlog of the socket (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 1024
#: How often the socket file and the text cache folder are checked for having been deleted,
#: only where their parent folders cannot be watched (see pathwatch.py); else never idly.
PATH_CHECK_S = 1.0
#: Quiet time after an event on those paths before checking them: a recursive delete of the
#: socket's folder finishes first (binding again at once would make its rmdir fail).
PATH_SETTLE_S = 0.2
#: Client connections remembered (their file descriptor: tuned, and watched for disconnection).
_CONNECTIONS_REMEMBERED = 4096


@dataclass(eq=False)
class _Held:
    """Replies to one client that is not reading, in order, until it reads or times out."""

    messages: deque[tuple[bytes, bool]] = field(default_factory=deque)  # (packed, is_error)
    nbytes: int = 0
    since: float = field(default_factory=time.monotonic)  # the last progress
    dropped: int = 0


class Daemon:
    def __init__(
        self,
        config: Config,
        backend_reason: str,
        endpoint: Endpoint,
        caches: CacheManager,
        worker: ModelWorker,
        outbox: Outbox,
        notifier: ServiceNotifier,
    ):
        self.config = config
        self.backend_reason = backend_reason
        self.notifier = notifier
        self.watcher: TextFolderWatcher | None = None
        self._status_sent = ""
        self.endpoint = endpoint
        self.caches = caches
        self.worker = worker
        self.outbox = outbox
        self.started = time.time()
        self.generations: dict[tuple[bytes, Any], Generation] = {}
        self.waiters: list[CacheWaiter] = []
        self.requests_received = 0
        self.errors_sent = 0
        self.clients_gone = 0
        self._blocked: dict[Generation, float] = {}  # stream -> since when its client stopped reading
        self._held: dict[bytes, _Held] = {}  # client -> replies it has not taken yet
        self._fd_of: OrderedDict[bytes, int] = OrderedDict()  # client -> its connection's fd
        self._on_fd: dict[int, set[bytes]] = {}
        self._monitor: zmq.Socket | None = None
        self._retry_soon = False
        self.replies_dropped = 0
        self._path_watch: PathWatch | None = None
        self._paths_changed = False  # set from the path watch's thread
        self._next_path_check: float | None = None  # when to check them next (None: on an event)
        self.exit_status = 0  # 1 when the daemon stops because it can no longer serve
        self._stop = False
        self._reload_requested = False
        self.reload_handler: Callable[[], None] | None = None
        self._ctx = zmq.Context.instance()
        self._router: zmq.Socket | None = None
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def backend(self) -> Backend:
        return self.worker.backend

    # -- life cycle --------------------------------------------------------------

    def bind(self) -> None:
        """Bind the claimed path; after this, clients can connect."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable reply = client gone, not silence
        router.setsockopt(zmq.MAXMSGSIZE, HARD_MESSAGE_LIMIT)
        router.setsockopt(zmq.SNDHWM, SEND_HWM)
        # Connections the kernel queues until libzmq accepts them (its default is 100): when
        # many clients connect at once, a client's connect(2) fails with EAGAIN past that.
        router.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        router.setsockopt(zmq.LINGER, 1000)
        # A client that disconnects is noticed at once, not at the next message sent to it:
        # a queued generation of a client that is gone never runs, a prefill is cut short.
        self._monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._router = router
        self._bind_path()
        log.info("listening on %s", self.endpoint.url)

    def _bind_path(self) -> None:
        assert self._router is not None
        old_umask = os.umask(0o117)
        try:
            self._router.bind(self.endpoint.url)
        finally:
            os.umask(old_umask)
        self.endpoint.secure()

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

    def watch_paths(self) -> None:
        """(Re)watch the socket file and the text folder: after binding, and after a reload
        moved the folder or a watched parent folder was replaced."""
        if self._path_watch is not None:
            self._path_watch.stop()
            self._path_watch = None
        watch = PathWatch([self.endpoint.path, self.caches.texts.folder], self._on_paths_changed)
        try:
            watch.start()
        except OSError as exc:
            log.warning("cannot watch %s: %s; checking them every %.0f s instead", sorted(watch.paths), exc, PATH_CHECK_S)
            self._next_path_check = time.monotonic() + PATH_CHECK_S
            return
        self._path_watch = watch
        self._next_path_check = None

    def _on_paths_changed(self) -> None:
        self._paths_changed = True
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._signal_w, b"p")

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then shut down cleanly."""
        assert self._router is not None
        self.watch_paths()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        poller.register(self.outbox.fileno(), zmq.POLLIN)
        poller.register(self._signal_r, zmq.POLLIN)
        while not self._stop:
            timeout = self._poll_timeout()
            events = dict(poller.poll(None if timeout is None else max(1, int(timeout * 1000))))
            if self._signal_r in events:
                self._drain_signal_pipe()
            if self._reload_requested:
                self._reload_requested = False
                if self.reload_handler is not None:
                    self.reload_handler()
            self._note_disconnections()
            if self._router in events:
                self._receive()
            self._flush()
            self._check_waiters(timeouts_only=True)
            self._check_paths()
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
        deadlines = [w.deadline for w in self.waiters]
        if self._next_path_check is not None:
            deadlines.append(self._next_path_check)
        if self._blocked or self._held:
            deadlines.append(now + (PROGRESS_RETRY_S if self._retry_soon else BLOCKED_RETRY_S))
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self.notifier.status("stopping: aborting the running generation")
        for gen in self.worker.shutdown():
            self.outbox.stream(gen, "error", error=WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down").to_wire())
        if not self.worker.join(timeout=10):
            log.error("the model worker did not stop within 10 s")
        for waiter in self.waiters:
            self._send_plain(waiter.identity, error_reply(waiter.request_id, WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")))
        self.waiters.clear()
        self._flush()
        assert self._router is not None
        if self._monitor is not None:
            self._router.disable_monitor()
            self._monitor.close(0)
        self._router.close()
        if self._path_watch is not None:
            self._path_watch.stop()
        self.endpoint.release()
        log.info("stopped")

    # -- receiving -----------------------------------------------------------------

    def _receive(self) -> None:
        assert self._router is not None
        for _ in range(256):  # then give the outbox a turn
            # Disconnections first: a file descriptor closed before a message arrived on its
            # reuse must not be taken for the new connection's (see _note_connection).
            self._note_disconnections()
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.requests_received += 1
            identity, body = frames[0].bytes, [f.bytes for f in frames[1:]]
            self._note_connection(identity, frames[-1])
            request_id = None
            try:
                if len(body) != 1:
                    raise WireError(ErrorCode.MALFORMED, f"expected one frame per message, got {len(body)}")
                request = unpack(body[0])
                request_id = _request_id(request)
                result = self._dispatch(identity, request)
            except WireError as exc:
                self._send_plain(identity, error_reply(request_id, exc))
                continue
            except Exception as exc:
                log.exception("request %r failed", request_id)
                self._send_plain(identity, error_reply(request_id, WireError(ErrorCode.INTERNAL, f"internal error: {exc.__class__.__name__}")))
                continue
            if result is not None:
                self._send_plain(identity, reply(request_id, "result", result=result))

    def _note_connection(self, identity: bytes, frame: zmq.Frame) -> None:
        """A client's first message: remember its connection's fd and shrink that connection's
        kernel send buffer (see SEND_HWM).

        libzmq reports a disconnection (to the monitor) before it closes the fd, and a new
        connection can only get the same number after that, so reading the monitor before
        every message keeps this map true.
        """
        if identity in self._fd_of:
            self._fd_of.move_to_end(identity)
            return
        try:
            fd = frame.get(zmq.SRCFD)  # the connection the message came in on
        except (zmq.ZMQError, AttributeError):
            return  # a libzmq without ZMQ_SRCFD: only SNDHWM bounds the queue
        if fd < 0:
            return
        self._fd_of[identity] = fd
        self._on_fd.setdefault(fd, set()).add(identity)
        if len(self._fd_of) > _CONNECTIONS_REMEMBERED:
            old, old_fd = self._fd_of.popitem(last=False)
            others = self._on_fd.get(old_fd, set())
            others.discard(old)
            if not others:
                self._on_fd.pop(old_fd, None)
        try:
            with socket.socket(fileno=os.dup(fd)) as conn:
                # libzmq's I/O thread owns that fd and may have closed it meanwhile (the number
                # then names something else): only a connection to our own socket is touched.
                if (
                    conn.family != socket.AF_UNIX
                    or conn.type != socket.SOCK_STREAM
                    or conn.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    or conn.getsockname() != str(self.endpoint.path)
                ):
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONNECTION_SNDBUF)
        except OSError:
            pass

    def _note_disconnections(self) -> None:
        """Clients whose connection closed: abort their generations, queued or running, and
        forget replies held for them."""
        if self._monitor is None:
            return
        gone: set[bytes] = set()
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                gone |= self._on_fd.pop(event["value"], set())
        if not gone:
            return
        for identity in gone:
            self._fd_of.pop(identity, None)
            self._held.pop(identity, None)
        # Newest first: the queued ones leave the queue before the running one (the oldest)
        # is aborted, so the worker does not start one of them in between.
        for gen in sorted((g for g in self.generations.values() if g.identity in gone), key=lambda g: g.received, reverse=True):
            self._client_gone(gen)

    def _dispatch(self, identity: bytes, request: dict[str, Any]) -> dict[str, Any] | None:
        version = request.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
            raise WireError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}", supported=[PROTOCOL_VERSION])
        op = request.get("op")
        command = commands.REGISTRY.get(op) if isinstance(op, str) else None
        if command is None:
            raise WireError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}", known=sorted(commands.REGISTRY))
        if self._stop:
            raise WireError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        return command(self, identity, request)

    # -- sending ---------------------------------------------------------------------

    def _send(self, identity: bytes, message: dict[str, Any]) -> str:
        """"sent", "gone" (client disconnected) or "blocked" (client not reading)."""
        return self._send_packed(identity, pack(message), message.get("type") == "error")

    def _send_packed(self, identity: bytes, data: bytes, is_error: bool) -> str:
        assert self._router is not None
        try:
            self._router.send_multipart([identity, data], zmq.NOBLOCK)
            if is_error:
                self.errors_sent += 1
            return "sent"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "gone"
            if exc.errno == zmq.EAGAIN:
                return "blocked"
            raise

    def _send_plain(self, identity: bytes, message: dict[str, Any]) -> None:
        """A one-shot reply; held (in order) while its client is not reading, never reordered."""
        data, is_error = pack(message), message.get("type") == "error"
        held = self._held.get(identity)
        if held is None:
            outcome = self._send_packed(identity, data, is_error)
            if outcome == "gone":
                log.debug("reply to a client that is gone was dropped")
            if outcome != "blocked":
                return
            held = self._held[identity] = _Held()
        size = len(data) + HELD_OVERHEAD
        if held.nbytes + size > MAX_HELD_BYTES:
            if not held.dropped:
                log.warning("a client is not reading its replies and has %d waiting; dropping more", len(held.messages))
            held.dropped += 1
            self.replies_dropped += 1
            return
        held.messages.append((data, is_error))
        held.nbytes += size

    def _flush_held(self) -> None:
        for identity, held in list(self._held.items()):
            sent = 0
            while held.messages:
                data, is_error = held.messages[0]
                outcome = self._send_packed(identity, data, is_error)
                if outcome == "blocked":
                    break
                held.messages.popleft()
                held.nbytes -= len(data) + HELD_OVERHEAD
                sent += 1
                if outcome == "gone":
                    held.messages.clear()
            if sent:
                held.since = time.monotonic()
                self._retry_soon = True
            if not held.messages:
                del self._held[identity]

    def _flush(self) -> None:
        self._retry_soon = False
        self._flush_held()
        plain, streams, changed = self.outbox.take()
        for identity, message in plain:
            self._send_plain(identity, message)
        for gen, messages in streams:
            self._flush_stream(gen, messages)
        if changed:
            self._check_waiters(names=changed)
        self._expire_blocked()

    def _flush_stream(self, gen: Generation, messages: list[dict[str, Any]]) -> None:
        for i, message in enumerate(messages):
            message["seq"] = gen.seq
            outcome = self._send(gen.identity, message)
            if outcome == "sent":
                gen.seq += 1
                if self._blocked.pop(gen, None) is not None:
                    self._retry_soon = True
                if message["type"] in ("done", "error"):
                    self.generations.pop(gen.key, None)
                continue
            del message["seq"]
            if outcome == "gone":
                self._client_gone(gen)
            else:
                self._blocked.setdefault(gen, time.monotonic())
                self.outbox.give_back(gen, messages[i:])
            return

    def _client_gone(self, gen: Generation) -> None:
        self.clients_gone += 1
        log.info("client of request %r is gone; aborting its generation", gen.request_id)
        self.outbox.drop(gen)
        self._blocked.pop(gen, None)
        self.generations.pop(gen.key, None)
        self.worker.cancel(gen, "client disconnected")

    def _expire_blocked(self) -> None:
        limit = self.config["daemon.slow_client_timeout"]
        now = time.monotonic()
        for gen, since in list(self._blocked.items()):
            if now - since > limit:
                log.warning("client of request %r has not read its stream for %.0f s; aborting", gen.request_id, now - since)
                self._abort_unread(gen)
        for identity, held in list(self._held.items()):
            if now - held.since > limit:
                log.warning("a client has not read its replies for %.0f s; dropping %d and aborting its generations", now - held.since, len(held.messages))
                self.replies_dropped += len(held.messages)
                del self._held[identity]
                for gen in [g for g in self.generations.values() if g.identity == identity]:
                    self._abort_unread(gen)

    def _abort_unread(self, gen: Generation) -> None:
        """A generation whose client stopped reading: abort it, drop its unsent text, and leave
        a final ``done`` (cancelled, "client not reading") for the client should it read again."""
        self._client_gone(gen)
        final = reply(gen.request_id, "done", seq=gen.seq, finish_reason="cancelled", reason="client not reading", cache=None, stats=None)
        self._send_plain(gen.identity, final)  # held while the client does not read, dropped if it never does

    # -- our paths -----------------------------------------------------------------------

    def _check_paths(self) -> None:
        """When a path watch event came (or, unwatched, once a second): is our socket file
        still there, and the text folder we watch?"""
        if self._paths_changed:  # each event postpones the check: let the other side finish
            self._paths_changed = False
            self._next_path_check = time.monotonic() + PATH_SETTLE_S
        if self._next_path_check is None or time.monotonic() < self._next_path_check:
            return
        self._next_path_check = None if self._path_watch is not None else time.monotonic() + PATH_CHECK_S
        self._check_socket()
        if self.watcher is not None and not self.watcher.intact():
            self._watch_again()
        if self._path_watch is not None and not self._path_watch.intact():
            self.watch_paths()

    def _check_socket(self) -> None:
        state = self.endpoint.state()
        if state == "ok":
            return
        path = self.endpoint.path
        if state == "missing":
            try:
                self.endpoint.reclaim()
                self._bind_path()
            except (EndpointError, OSError, zmq.ZMQError) as exc:
                self._fail(f"the socket file {path} was deleted and cannot be bound again: {exc}")
                return
            log.warning("the socket file %s was deleted; bound it again (connected clients kept their connections)", path)
            return
        self._fail(f"the socket file {path} was replaced by another process; new clients cannot reach this daemon")

    def _fail(self, message: str) -> None:
        """Stop serving, cleanly, with a non-zero exit status (systemd then restarts us)."""
        log.error("%s; stopping", message)
        self.exit_status = 1
        self._stop = True

    def _watch_again(self) -> None:
        """The text folder was deleted (or replaced): make it again, watch the new one, rescan."""
        assert self.watcher is not None
        folder = self.caches.texts.folder
        try:
            make_dirs(folder, TEXT_DIR_MODE)
            watcher = TextFolderWatcher(str(folder), self.config["cache.debounce_ms"] / 1000, self.caches.refresh)
        except OSError as exc:
            log.error("the text cache folder %s is gone and cannot be made again: %s", folder, exc)
            return
        self.watcher.stop()
        self.watcher = watcher
        watcher.start()
        self.caches.rescan()
        log.warning("the text cache folder %s was deleted or replaced; watching it again", folder)

    # -- cache wait ----------------------------------------------------------------------

    def _check_waiters(self, names: set[str] | None = None, timeouts_only: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for waiter in self.waiters:
            if timeouts_only or (names is not None and waiter.name not in names):
                if now >= waiter.deadline:
                    self._send_plain(waiter.identity, error_reply(waiter.request_id, WireError(ErrorCode.TIMEOUT, f"cache {waiter.name} is not ready yet")))
                else:
                    keep.append(waiter)
                continue
            if not self.answer_waiter(waiter):
                keep.append(waiter)
        self.waiters = keep

    def answer_waiter(self, waiter: CacheWaiter) -> bool:
        """Reply if the cache has settled; False while it is still being built."""
        done, error = self.caches.settled(waiter.name)
        if not done:
            if time.monotonic() < waiter.deadline:
                return False
            self._send_plain(waiter.identity, error_reply(waiter.request_id, WireError(ErrorCode.TIMEOUT, f"cache {waiter.name} is not ready yet")))
            return True
        if error is not None:
            code = ErrorCode.NOT_FOUND if error == "no such text cache" else ErrorCode.CACHE_BUILD_FAILED
            self._send_plain(waiter.identity, error_reply(waiter.request_id, WireError(code, f"cache {waiter.name}: {error}")))
        else:
            self._send_plain(waiter.identity, reply(waiter.request_id, "result", result=self.caches.entry(waiter.name).public()))
        return True

    # -- status ---------------------------------------------------------------------------

    def status_line(self) -> str:
        """One line for `systemctl status`: what runs, how busy, caches, the last error."""
        activity = self.worker.activity()
        states = self.caches.counts()
        doing = "generating" if activity["running"] == "generate" else f"building cache {activity['building']}" if activity["building"] else "idle"
        parts = [
            f"{self.backend.describe().get('name', '?')} on {self.backend.kind}",
            f"{doing}, {activity['queued']} queued",
            f"caches: {states.get('ready', 0)} ready, {activity['builds_queued'] + (1 if activity['building'] else 0)} building",
            f"{self.worker.counters.completed} served",
        ]
        if states.get("failed"):
            parts.append(f"{states['failed']} cache(s) failed")
        if self.worker.last_error:
            parts.append(f"last error: {self.worker.last_error}")
        return "; ".join(parts)

    def _update_status(self) -> None:
        if not self.notifier.enabled:
            return
        line = self.status_line()
        if line != self._status_sent:
            self._status_sent = line
            self.notifier.status(line)

    def backend_replaced(self, backend: Backend, reason: str | None, error: str | None) -> None:
        """From the worker, after a reload's model swap (or its failure)."""
        if reason is not None:
            self.backend_reason = reason
        self.notifier.ready(f"reload failed, still serving the old model: {error}" if error else self.status_line())
        self.outbox.cache_changed("")  # wake the loop to refresh the status line

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "socket": str(self.endpoint.path),
            "backend": self.backend.kind,
            "backend_reason": self.backend_reason,
            "model": self.backend.describe(),
            "worker": self.worker.activity(),
            "healthy": self.worker.healthy(within=60.0),
            "counters": {
                "requests": self.requests_received,
                "errors_sent": self.errors_sent,
                "clients_gone": self.clients_gone,
                "replies_dropped": self.replies_dropped,
                **self.worker.counters.as_dict(),
            },
            "caches": {
                "text_dir": str(self.caches.texts.folder),
                "binary_dir": str(self.caches.binaries.folder),
                "states": self.caches.counts(),
                "builds": self.caches.builds,
                "memory": self.caches.memory(),
            },
            "limits": {
                "max_queue": self.worker.max_queue,
                "max_tokens": self.config["daemon.max_tokens_limit"],
                "max_prompt_chars": self.config["daemon.max_prompt_chars"],
                "max_message_bytes": MAX_MESSAGE_BYTES,
            },
        }


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
