"""The daemon <-> runner link: pickled tuples, length-prefixed, over a Unix socketpair.

Both ends are the same code from the same installation (the daemon starts the runner with
its own interpreter), so pickle carries the typed values (configurations, cache entries,
sampling parameters) as they are. One frame costs a ``send`` and a ``recv`` and a few
microseconds of pickling in a loop (bench/runner_boundary.py), but ~140 us between two
decode steps, whose weights have emptied the caches: token text is paced before it is
framed (``child.ForwardingOutbox``).
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from typing import Any

_LENGTH = struct.Struct("<I")


class ChannelClosed(Exception):
    """The other end is gone (its process exited, or it closed the link)."""


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()  # several threads send; frames must not interleave

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self.sock.sendall(_LENGTH.pack(len(data)) + data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None

    def receive(self) -> Any:
        """The next message (one reader thread only); ChannelClosed at the end."""
        (length,) = _LENGTH.unpack(self._exactly(_LENGTH.size))
        return pickle.loads(self._exactly(length))

    def _exactly(self, count: int) -> bytes:
        buffer = bytearray(count)
        view, got = memoryview(buffer), 0
        while got < count:
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            if n == 0:
                raise ChannelClosed("end of stream")
            got += n
        return bytes(buffer)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
