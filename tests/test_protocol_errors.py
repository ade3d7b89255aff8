"""Every kind of bad message gets its documented error, and the daemon keeps serving."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import zmq

from conftest import DaemonProcess
from rkllmd.protocol import MAX_MESSAGE_BYTES, ErrorCode


class RawPeer:
    """A DEALER that sends arbitrary frames, as a client in another language might."""

    def __init__(self, daemon: DaemonProcess):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{daemon.socket}")

    def exchange(self, *frames: bytes, timeout: float = 10) -> dict[str, Any]:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peer(daemon: DaemonProcess):
    p = RawPeer(daemon)
    yield p
    p.close()
    with daemon.client() as client:  # whatever was sent, the daemon still serves
        assert client.status()["healthy"] is True


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


def request(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": "r1", **fields}


CASES = [
    ("not msgpack", [b"\xc1\xc1\xc1"], ErrorCode.MALFORMED, None),
    ("truncated msgpack", [pack(request(op="status"))[:-3]], ErrorCode.MALFORMED, None),
    ("empty frame", [b""], ErrorCode.MALFORMED, None),
    ("array, not map", [pack([1, 2, 3])], ErrorCode.MALFORMED, None),
    ("integer, not map", [pack(7)], ErrorCode.MALFORMED, None),
    ("two frames", [pack(request(op="status")), b"extra"], ErrorCode.MALFORMED, None),
    ("deep nesting", [pack(request(op="status", x=nested(20)))], ErrorCode.MALFORMED, None),
    ("unknown version", [pack({"v": 99, "id": "r1", "op": "status"})], ErrorCode.UNSUPPORTED_VERSION, "r1"),
    ("missing version", [pack({"id": "r1", "op": "status"})], ErrorCode.UNSUPPORTED_VERSION, "r1"),
    ("missing id", [pack({"v": 1, "op": "status"})], ErrorCode.INVALID_FIELD, None),
    ("id of wrong type", [pack({"v": 1, "id": [1], "op": "status"})], ErrorCode.INVALID_FIELD, None),
    ("unknown op", [pack(request(op="launch_missiles"))], ErrorCode.UNKNOWN_OP, "r1"),
    ("op of wrong type", [pack(request(op=3))], ErrorCode.UNKNOWN_OP, "r1"),
    ("prompt of wrong type", [pack(request(op="generate", prompt=42))], ErrorCode.INVALID_FIELD, "r1"),
    ("no prompt", [pack(request(op="generate"))], ErrorCode.INVALID_FIELD, "r1"),
    ("messages not a list", [pack(request(op="generate", messages="hi"))], ErrorCode.INVALID_FIELD, "r1"),
    ("bad role", [pack(request(op="generate", messages=[{"role": "god", "content": "x"}]))], ErrorCode.INVALID_FIELD, "r1"),
    ("temperature string", [pack(request(op="generate", prompt="x", temperature="hot"))], ErrorCode.INVALID_FIELD, "r1"),
    ("temperature NaN", [pack(request(op="generate", prompt="x", temperature=float("nan")))], ErrorCode.INVALID_FIELD, "r1"),
    ("max_tokens too big", [pack(request(op="generate", prompt="x", max_tokens=10**9))], ErrorCode.INVALID_FIELD, "r1"),
    ("max_tokens bool", [pack(request(op="generate", prompt="x", max_tokens=True))], ErrorCode.INVALID_FIELD, "r1"),
    ("stop not strings", [pack(request(op="generate", prompt="x", stop=[1]))], ErrorCode.INVALID_FIELD, "r1"),
    ("prompt too long", [pack(request(op="generate", prompt="x" * 300_000))], ErrorCode.TOO_LARGE, "r1"),
    ("message too large", [pack(request(op="status", pad=b"\0" * (MAX_MESSAGE_BYTES + 10)))], ErrorCode.TOO_LARGE, None),
    ("cancel without target", [pack(request(op="cancel"))], ErrorCode.INVALID_FIELD, "r1"),
    ("cancel of nothing", [pack(request(op="cancel", target="nope"))], ErrorCode.NOT_FOUND, "r1"),
    ("hostile cache name", [pack(request(op="cache.show", name="../../etc/passwd"))], ErrorCode.INVALID_NAME, "r1"),
    ("unknown cache", [pack(request(op="generate", prompt="x", cache="no-such-cache"))], ErrorCode.NOT_FOUND, "r1"),
]


@pytest.mark.parametrize("frames, code, reply_id", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_message_gets_its_error(peer: RawPeer, frames: list[bytes], code: ErrorCode, reply_id: Any) -> None:
    reply = peer.exchange(*frames)
    assert reply["v"] == 1 and reply["type"] == "error"
    assert reply["id"] == reply_id
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["name"] == code.name.lower()
    assert reply["error"]["message"]


def test_duplicate_live_id_is_refused(peer: RawPeer) -> None:
    first = peer.exchange(pack(request(op="generate", prompt="Tell me a long story.", max_tokens=64)))
    assert first["type"] == "queued"
    peer.sock.send(pack(request(op="generate", prompt="again")))
    while True:
        assert peer.sock.poll(30_000)
        reply = msgpack.unpackb(peer.sock.recv(), raw=False)
        if reply["type"] == "error":
            assert reply["error"]["code"] == ErrorCode.DUPLICATE_ID
            break
    peer.sock.send(pack({"v": 1, "id": "c", "op": "cancel", "target": "r1"}))
    while True:  # drain to the end of r1's stream
        assert peer.sock.poll(30_000)
        reply = msgpack.unpackb(peer.sock.recv(), raw=False)
        if reply["id"] == "r1" and reply["type"] == "done":
            assert reply["finish_reason"] == "cancelled"
            break


def test_generation_still_correct_after_garbage(peer: RawPeer, daemon: DaemonProcess) -> None:
    for frames, _, _ in [c[1:] for c in CASES[:8]]:
        peer.exchange(*frames)
    with daemon.client() as client:
        result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=48).wait()
    assert result.text == "The capital of France is Paris."
