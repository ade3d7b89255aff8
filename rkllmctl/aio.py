"""The asyncio counterpart of Client, over pyzmq's asyncio sockets (for rkllmd-http).

One AsyncClient holds one DEALER socket shared by every request of its event loop: a
reader task hands each reply to its request by id, so many generations stream at once
over one connection. Requests and replies are framed and checked by the same functions
as the sync client (rkllmctl/client.py). When the daemon goes away (stopped, restarted)
every request in flight ends with DaemonUnreachable; ZeroMQ reconnects by itself and the
next requests are served by the new daemon.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from rkllmd.paths import default_socket

from .client import LINGER_READ_S, Event, GenerationResult, Piece, PullProgress, PullReader, StreamReader, decoded_embeddings, decode_reply, encode_request, probe, result_of
from .errors import DaemonUnreachable, ProtocolViolation

log = logging.getLogger(__name__)


class _Pending:
    """One request's inbox, and the connection it was sent on (see AsyncClient._dropped)."""

    def __init__(self, epoch: int):
        self.queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self.epoch = epoch


class AsyncClient:
    """``async with AsyncClient(path) as c: await c.status()``; ``timeout`` bounds the wait
    for each request's first reply (a generation then streams as long as it takes)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0):
        self.path = Path(socket_path) if socket_path else default_socket(client=True)
        self.timeout = timeout
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(f"ipc://{self.path}")
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._connected = False
        self._epoch = 0  # counts connections: a drop fails the requests sent before it
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch())]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- plumbing --------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                message = decode_reply(data)
            except ProtocolViolation as exc:
                log.error("%s", exc)
                continue
            pending = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if pending is not None:
                pending.queue.put_nowait(message)
            elif message.get("id") is None and message.get("type") == "error":
                log.error("the daemon could not read a request: %s", message.get("error"))

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected = False
                self._epoch += 1
                # What the daemon sent before closing may still be on its way: read it first.
                asyncio.get_running_loop().call_later(LINGER_READ_S, self._dropped, self._epoch)

    def _dropped(self, epoch: int) -> None:
        error = DaemonUnreachable(f"rkllmd at {self.path} closed the connection (stopped or restarted); the request is lost")
        for pending in self._pending.values():
            if pending.epoch < epoch:
                pending.queue.put_nowait(error)

    def send(self, op: str, **fields: Any) -> int:
        """Send one request; return its id. Refused at once when no daemon listens."""
        request_id = next(self._ids)
        data = encode_request(op, request_id, fields)
        if not self._connected:
            probe(self.path)  # a clear error now, not a wait until the timeout
        self._pending[request_id] = _Pending(self._epoch)
        self._sock.send(data)
        return request_id

    async def receive(self, request_id: int, timeout: float | None) -> dict[str, Any]:
        pending = self._pending[request_id]
        try:
            item = await asyncio.wait_for(pending.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise DaemonUnreachable(f"no answer from {self.path} within {timeout:g} s; is rkllmd hung or busy loading?") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def forget(self, request_id: int) -> None:
        """Replies to ``request_id`` that still come are dropped."""
        self._pending.pop(request_id, None)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """A one-shot request: its result map, or DaemonError."""
        request_id = self.send(op, **fields)
        try:
            return result_of(await self.receive(request_id, self.timeout))
        finally:
            self.forget(request_id)

    def cancel_soon(self, request_id: int) -> None:
        """Send ``cancel`` for a generation still in flight and forget its replies; its
        ``done`` (finish_reason cancelled) and the cancel's result are dropped when they come."""
        if self._pending.pop(request_id, None) is None:
            return
        try:
            self._sock.send(encode_request("cancel", next(self._ids), {"target": request_id}))
        except zmq.ZMQError as exc:
            log.warning("could not cancel generation %s: %s", request_id, exc)

    # -- operations ---------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping")

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def embed(self, **fields: Any) -> dict[str, Any]:
        """The ``embed`` result, embeddings as lists of floats; no timeout (a long list takes
        its time; a daemon that goes away fails it)."""
        request_id = self.send("embed", **fields)
        try:
            return decoded_embeddings(result_of(await self.receive(request_id, None)))
        finally:
            self.forget(request_id)

    def generate(self, **fields: Any) -> AsyncStream:
        """``async with client.generate(prompt=...) as stream: async for piece in stream``;
        fields as rkllmd/schema.py declares them. Leaving the block early cancels it."""
        started = time.monotonic()
        return AsyncStream(self, self.send("generate", **fields), StreamReader(started))

    async def pull(self, **fields: Any) -> AsyncIterator[PullProgress]:
        """A pull's statuses as they come, up to its "success" (fields as rkllmd/schema.py
        declares them); DaemonError for its error. Leaving early (the HTTP client went away)
        cancels it on the daemon."""
        reader = PullReader()
        request_id = self.send("pull", **fields)
        ended = False  # its done or its error came: nothing to cancel
        try:
            while reader.result is None:
                message = await self.receive(request_id, self.timeout if reader.expected_seq == 0 else None)
                ended = message["type"] in ("done", "error")
                event = reader.feed(message)
                if event is not None:
                    yield event
        finally:
            if not ended:
                self.cancel_soon(request_id)
            self.forget(request_id)


class AsyncStream:
    """One generation's messages: async-iterate for Pieces; ``result`` once it ended."""

    def __init__(self, client: AsyncClient, request_id: int, reader: StreamReader):
        self.client = client
        self.request_id = request_id
        self.reader = reader

    @property
    def result(self) -> GenerationResult | None:
        return self.reader.result

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader.result is None:
            self.cancel()
        self.client.forget(self.request_id)

    def cancel(self) -> None:
        """Ask the daemon to stop this generation (queued or running), without waiting:
        this runs when the task that followed it is itself being cancelled."""
        self.client.cancel_soon(self.request_id)

    async def first(self) -> None:
        """Wait for the daemon to take the request in (its ``queued``), or raise its error."""
        while self.reader.expected_seq == 0:
            self.reader.feed(await self.client.receive(self.request_id, self.client.timeout))

    async def __aiter__(self) -> AsyncIterator[Piece]:
        async for event in self.events():
            if isinstance(event, Piece):
                yield event

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the generation as it comes (see Stream.events): queue position
        and prefill progress as well as the Pieces."""
        while self.reader.result is None:
            timeout = self.client.timeout if self.reader.expected_seq == 0 else None
            event = self.reader.feed(await self.client.receive(self.request_id, timeout))
            if event is not None:
                yield event

    async def wait(self) -> GenerationResult:
        async for _ in self.events():
            pass
        assert self.reader.result is not None
        return self.reader.result

