"""Which client a disconnection belongs to, when the kernel hands a closed connection's file
descriptor to the next one.

The socket loop learns of closed connections from libzmq's monitor, by file descriptor. A
close and the next connection's first message (on the same number) can arrive together, in
any gap of the loop; on a loaded 2-core CI machine one fell between the loop's reading of the
monitor and its receive, the close was then taken for the new client's, and the new client's
generation was aborted before its ``queued`` was sent (a 30 s silence). These tests replay
that gap with a real ROUTER, real connections and libzmq's real monitor events, holding the
events back until the receive returns.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from rkllmd.config import DaemonConfig
from rkllmd.connections import Connections
from rkllmd.outbox import Generation, Outbox
from rkllmd.sampling import SamplingParams
from rkllmd.templates.output import OutputSplitter


#: Connections tried until one reuses a closed connection's fd (one in two does, here).
REUSE_ATTEMPTS = 20


class RecordingWorker:
    """What Connections asks of the model worker: only cancellations, recorded."""

    def __init__(self) -> None:
        self.cancelled: list[tuple[Generation, str]] = []

    def cancel(self, gen: Generation, reason: str = "cancelled") -> str | None:
        self.cancelled.append((gen, reason))
        return "queued"


class LateMonitor:
    """libzmq's monitor socket whose events become visible only after the router's next
    receive returns: the disconnection "arrives" between the loop's look and its receive."""

    def __init__(self, real: zmq.Socket):
        self.real = real
        self.visible = False

    def poll(self, timeout: int = 0) -> int:
        return self.real.poll(timeout) if self.visible else 0

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@pytest.fixture
def connections(tmp_path: Path):
    outbox = Outbox()
    worker = RecordingWorker()
    conns = Connections(tmp_path / "s", outbox, worker, DaemonConfig())  # type: ignore[arg-type]
    conns.bind(f"ipc://{tmp_path / 's'}")
    yield conns, worker
    conns.close()
    outbox.close()


def _dealer(path: Path) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{path}")
    return sock


def _receive(conns: Connections) -> tuple[bytes, list[bytes]]:
    assert conns.router.poll(10_000), "the message did not arrive"
    message = conns.receive()
    assert message is not None
    return message


def _generation(identity: bytes) -> Generation:
    return Generation(identity=identity, request_id=1, prompt="x", params=SamplingParams(), cache=None, use_cache=True, received=time.monotonic(), output=OutputSplitter(None))


def test_a_close_seen_late_is_not_taken_for_the_next_connection_on_its_fd(connections) -> None:
    conns, worker = connections
    real_monitor = conns._monitor
    receive = conns.router.recv_multipart
    for _ in range(REUSE_ATTEMPTS):  # until the kernel gives the second connection the first's fd
        first = _dealer(conns.socket_path)
        first.send(b"hello")
        first_identity, _ = _receive(conns)
        first_fd = conns._fd_of[first_identity]
        first.close()
        assert real_monitor.poll(10_000), "libzmq reported no disconnection"

        # The close is in the monitor; the loop has not looked. Hide it until the next receive.
        late = LateMonitor(real_monitor)
        conns._monitor = late

        def receive_then_reveal(*args, late=late, **kwargs):
            frames = receive(*args, **kwargs)
            late.visible = True
            return frames

        conns.router.recv_multipart = receive_then_reveal  # type: ignore[method-assign]
        second = _dealer(conns.socket_path)
        try:
            second.send(b"hello")
            second_identity, _ = _receive(conns)
            gen = _generation(second_identity)
            conns.generations[gen.key] = gen
            conns.note_disconnections()  # the loop's next look at the monitor
            if conns._fd_of.get(second_identity) != first_fd:
                conns.generations.clear()
                continue
            assert worker.cancelled == [], "the first client's close was taken for the second client's"
            assert conns.generations.get(gen.key) is gen
            return
        finally:
            second.close()
            conns._monitor = real_monitor
            conns.router.recv_multipart = receive  # type: ignore[method-assign]
    pytest.fail(f"the kernel never gave a new connection a closed one's fd in {REUSE_ATTEMPTS} tries")


def test_a_real_close_still_aborts_that_clients_generation(connections) -> None:
    conns, worker = connections
    client = _dealer(conns.socket_path)
    client.send(b"hello")
    identity, _ = _receive(conns)
    gen = _generation(identity)
    conns.generations[gen.key] = gen
    client.close()
    deadline = time.monotonic() + 10
    while not worker.cancelled and time.monotonic() < deadline:
        conns._monitor.poll(100)
        conns.note_disconnections()
    assert worker.cancelled == [(gen, "client disconnected")]
    assert gen.key not in conns.generations
