"""The clients of the ROUTER socket: sending to them, and what to do when they do not read.

Only the socket loop's thread uses this object. It owns the socket, the live
generations of each client (their streams), replies held for clients that stopped
reading, and the clock that gives up on such clients (``daemon.slow_client_timeout``).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .config import DaemonConfig
from .outbox import NO_OUTPUT, Generation, Outbox
from .protocol import MAX_MESSAGE_BYTES, pack, reply
from .scheduler import Scheduler

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
#: Client connections remembered (their file descriptor: tuned, and watched for disconnection).
_CONNECTIONS_REMEMBERED = 4096


@dataclass
class Traffic:
    """Totals reported by status; written by the socket loop only."""

    requests: int = 0
    errors_sent: int = 0
    clients_gone: int = 0
    replies_dropped: int = 0


@dataclass(eq=False)
class _Held:
    """Replies to one client that is not reading, in order, until it reads or times out."""

    messages: deque[tuple[bytes, bool]] = field(default_factory=deque)  # (packed, is_error)
    nbytes: int = 0
    since: float = field(default_factory=time.monotonic)  # the last progress
    dropped: int = 0


class Connections:
    def __init__(self, socket_path: Path, outbox: Outbox, scheduler: Scheduler, config: DaemonConfig):
        self.socket_path = socket_path
        self.outbox = outbox
        self.scheduler = scheduler  # cancels a generation wherever it waits or runs
        self.slow_client_timeout = config.slow_client_timeout
        self.traffic = Traffic()
        self.generations: dict[tuple[bytes, Any], Generation] = {}  # live streams by (client, request id)
        self._blocked: dict[Generation, float] = {}  # stream -> since when its client stopped reading
        self._held: dict[bytes, _Held] = {}  # client -> replies it has not taken yet
        self._fd_of: OrderedDict[bytes, int] = OrderedDict()  # client -> its connection's fd
        self._on_fd: dict[int, set[bytes]] = {}
        self._pid_of: dict[bytes, int] = {}  # client -> the process at the other end of its connection
        self._retry_soon = False
        router = zmq.Context.instance().socket(zmq.ROUTER)
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
        self.router = router

    def configure(self, config: DaemonConfig) -> None:
        """Apply a reloaded [daemon] section."""
        self.slow_client_timeout = config.slow_client_timeout

    def bind(self, url: str) -> None:
        """Bind (again) with the socket file created 0660 (see endpoint.py)."""
        old_umask = os.umask(0o117)
        try:
            self.router.bind(url)
        finally:
            os.umask(old_umask)

    def close(self) -> None:
        self.router.disable_monitor()
        self._monitor.close(0)
        self.router.close()

    def pollables(self) -> list[Any]:
        return [self.router, self._monitor]

    def retry_after(self) -> float | None:
        """Seconds until a blocked client should be tried again (None: nobody is blocked)."""
        if self._blocked or self._held:
            return PROGRESS_RETRY_S if self._retry_soon else BLOCKED_RETRY_S
        return None

    # -- receiving -----------------------------------------------------------------

    def receive(self) -> tuple[bytes, list[bytes]] | None:
        """The next message, as (client, frames after its identity), or None."""
        try:
            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        # Disconnections after the message, before its connection is noted: every one that
        # happened before the message arrived is visible now, so the close of an earlier
        # connection whose fd this one reuses is not taken for this one's (see _note_connection).
        self.note_disconnections()
        self.traffic.requests += 1
        identity = frames[0].bytes
        self._note_connection(identity, frames[-1])
        return identity, [f.bytes for f in frames[1:]]

    def _note_connection(self, identity: bytes, frame: zmq.Frame) -> None:
        """A client's first message: remember its connection's fd and shrink that connection's
        kernel send buffer (see SEND_HWM).

        libzmq reports a disconnection (to the monitor) before it closes the fd, and a new
        connection can only get the same number after that; its messages come later still.
        So the monitor read after a message was received holds every disconnection of the
        fd's earlier owners. Read before the receive it may not: a close and the next
        connection's first message can both arrive in between (a socket loop descheduled
        there, as on a loaded 2-core machine), and the close, read later, would then be
        taken for the new client's: its generation aborted, and its ``queued`` never sent.
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
            self._pid_of.pop(old, None)
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
                    or conn.getsockname() != str(self.socket_path)
                ):
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONNECTION_SNDBUF)
                pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
                if pid > 0:
                    self._pid_of[identity] = pid
        except OSError:
            pass

    def client_name(self, identity: bytes) -> str:
        """Who a client is, for status and logs: "pid N" (the connecting process, from
        SO_PEERCRED), else its ZeroMQ routing identity in hex."""
        pid = self._pid_of.get(identity)
        return f"pid {pid}" if pid is not None else f"zmq {identity.hex()}"

    def note_disconnections(self) -> None:
        """Clients whose connection closed: abort their generations, queued or running, and
        forget replies held for them."""
        gone: set[bytes] = set()
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                gone |= self._on_fd.pop(event["value"], set())
        if not gone:
            return
        for identity in gone:
            self._fd_of.pop(identity, None)
            self._pid_of.pop(identity, None)
            self._held.pop(identity, None)
        # Newest first: the queued ones leave the queue before the running one (the oldest)
        # is aborted, so the worker does not start one of them in between.
        for gen in sorted((g for g in self.generations.values() if g.identity in gone), key=lambda g: g.received, reverse=True):
            self._client_gone(gen)

    # -- sending ---------------------------------------------------------------------

    def _send(self, identity: bytes, data: bytes, is_error: bool) -> str:
        """"sent", "gone" (client disconnected) or "blocked" (client not reading)."""
        try:
            self.router.send_multipart([identity, data], zmq.NOBLOCK)
            if is_error:
                self.traffic.errors_sent += 1
            return "sent"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "gone"
            if exc.errno == zmq.EAGAIN:
                return "blocked"
            raise

    def send(self, identity: bytes, message: dict[str, Any]) -> None:
        """A one-shot reply; held (in order) while its client is not reading, never reordered."""
        data, is_error = pack(message), message.get("type") == "error"
        held = self._held.get(identity)
        if held is None:
            outcome = self._send(identity, data, is_error)
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
            self.traffic.replies_dropped += 1
            return
        held.messages.append((data, is_error))
        held.nbytes += size

    def flush(self) -> None:
        """Send what is waiting: held replies, then the outbox's replies and streams; give up
        on clients that have not read for too long."""
        self._retry_soon = False
        self._flush_held()
        plain, streams = self.outbox.take()
        for identity, message in plain:
            self.send(identity, message)
        for gen, messages in streams:
            self._flush_stream(gen, messages)
        self._expire_blocked()

    def _flush_held(self) -> None:
        for identity, held in list(self._held.items()):
            sent = 0
            while held.messages:
                data, is_error = held.messages[0]
                outcome = self._send(identity, data, is_error)
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

    def _flush_stream(self, gen: Generation, messages: list[dict[str, Any]]) -> None:
        for i, message in enumerate(messages):
            message["seq"] = gen.seq
            outcome = self._send(gen.identity, pack(message), message["type"] == "error")
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
        self.traffic.clients_gone += 1
        log.info("client of request %r is gone; aborting its generation", gen.request_id)
        self.outbox.drop(gen)
        self._blocked.pop(gen, None)
        self.generations.pop(gen.key, None)
        self.scheduler.cancel(gen, "client disconnected")

    def _expire_blocked(self) -> None:
        limit = self.slow_client_timeout
        now = time.monotonic()
        for gen, since in list(self._blocked.items()):
            if now - since > limit:
                log.warning("client of request %r has not read its stream for %.0f s; aborting", gen.request_id, now - since)
                self._abort_unread(gen)
        for identity, held in list(self._held.items()):
            if now - held.since > limit:
                log.warning("a client has not read its replies for %.0f s; dropping %d and aborting its generations", now - held.since, len(held.messages))
                self.traffic.replies_dropped += len(held.messages)
                del self._held[identity]
                for gen in [g for g in self.generations.values() if g.identity == identity]:
                    self._abort_unread(gen)

    def _abort_unread(self, gen: Generation) -> None:
        """A generation whose client stopped reading: abort it, drop its unsent text, and leave
        a final ``done`` (cancelled, "client not reading") for the client should it read again."""
        self._client_gone(gen)
        final = reply(gen.request_id, "done", seq=gen.seq, finish_reason="cancelled", reason="client not reading", cache=None, stats=None, **NO_OUTPUT)
        self.send(gen.identity, final)  # held while the client does not read, dropped if it never does
