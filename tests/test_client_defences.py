"""The client's own defences: whatever the daemon sends that the protocol does not allow is a
protocol violation, and rkllmctl exits 4 saying so.

No rkllmd can be made to misbehave so, so a raw ZeroMQ ROUTER stands in for it on a socket
path and answers each request with frames the test scripts.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import zmq

from conftest import rkllmctl

Script = Callable[[dict[str, Any]], list[bytes]]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class StandIn:
    """A ROUTER bound where rkllmd would be, answering every request with ``script(request)``."""

    def __init__(self, script: Script):
        self.folder = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
        self.socket = self.folder / "stand-in.sock"
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        assert self._bound.wait(10), "the stand-in did not bind"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _serve(self) -> None:
        router = zmq.Context.instance().socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"ipc://{self.socket}")
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not router.poll(50):
                    continue
                identity, body = router.recv_multipart()
                request = msgpack.unpackb(body, raw=False)
                self.requests.append(request)
                for frame in self.script(request):
                    router.send_multipart([identity, frame])
        finally:
            router.close(0)


def stream(*messages: dict[str, Any]) -> Script:
    """Answer a request with these messages, each given the request's id."""
    return lambda request: [pack({"v": 1, "id": request["id"], **m}) for m in messages]


CASES = [
    (
        "a gap in seq",
        ["generate", "hi"],
        stream({"type": "queued", "seq": 0, "position": 0}, {"type": "started", "seq": 1, "queue_ms": 0.1}, {"type": "token", "seq": 3, "text": "x"}),
        "stream message 3 arrived when 2 was due",
    ),
    (
        "a message of an unknown type",
        ["status"],
        stream({"type": "surprise", "result": {}}),
        "unknown type 'surprise'",
    ),
    (
        "a reply that is not a map",
        ["status"],
        lambda request: [pack([1, request["id"], "result"])],
        "a list, not a map",
    ),
    (
        "a reply that is not msgpack",
        ["status"],
        lambda request: [b"\xc1\x00garbage"],
        "not a msgpack message",
    ),
    (
        "a result that is not a map",
        ["status"],
        stream({"type": "result", "result": 7}),
        "a result that is not a map",
    ),
    (
        "a one-shot reply inside a stream",
        ["generate", "hi"],
        stream({"type": "queued", "seq": 0, "position": 0}, {"type": "result", "seq": 1, "result": {}}),
        "unexpected 'result' message in a generation stream",
    ),
]


@pytest.mark.parametrize("argv, script, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_protocol_violations_exit_4(argv: list[str], script: Script, says: str) -> None:
    with StandIn(script) as stand_in:
        run = rkllmctl("--timeout", "20", *argv, socket=stand_in.socket, timeout=60)
    assert stand_in.requests and stand_in.requests[0]["op"] == argv[0], stand_in.requests
    assert run.returncode == 4, (run.returncode, run.stdout, run.stderr)
    assert "protocol error" in run.stderr and says in run.stderr, run.stderr
