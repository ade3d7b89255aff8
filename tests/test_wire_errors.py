"""Errors that only a busy, small or broken daemon gives, produced over the wire:
queue_full, timeout, context_overflow, and internal from faults injected by the test.

The faults are put in from this side: the daemon runs under a launcher that wraps three of
its functions (the chat template, the start of a generation on the model, a text cache write) to raise when
a request carries a marker. The product has no hook for it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from conftest import DaemonProcess
from reliability import RawPeer, check_envelope, documented_errors

LAUNCHER = r"""
import sys

from rkllmd.backends.cpu.backend import CpuBackend
from rkllmd.caches.text import TextStore

def wrap(cls, name, faulty):
    original = getattr(cls, name)
    def wrapper(self, *args, **kwargs):
        if faulty(*args):
            raise RuntimeError("fault injected by the test")
        return original(self, *args, **kwargs)
    setattr(cls, name, wrapper)

wrap(CpuBackend, "render", lambda messages, *rest: any("FAULT:render" in m["content"] for m in messages))
wrap(CpuBackend, "start", lambda prompt, *rest: "FAULT:start" in prompt)
wrap(TextStore, "write", lambda name, *rest: name == "fault-disk")

from rkllmd.cli import main
sys.exit(main(sys.argv[1:]))
"""
CONTEXT_LENGTH = 256


class FaultyDaemon(DaemonProcess):
    def command(self) -> list[str]:
        python, dash_m, module, *args = super().command()
        assert (dash_m, module) == ("-m", "rkllmd")
        return [python, "-c", LAUNCHER, *args]


@pytest.fixture(scope="module")
def faulty() -> DaemonProcess:
    # One generation at a time: a second one waits (and fills the queue of one). The faults
    # are patched into this process's classes, so the model runs in it (daemon.runners =
    # thread): a runner process would import them unpatched.
    env = {"RKLLMD_MAX_QUEUE": "1", "RKLLMD_MAX_BATCH": "1", "RKLLMD_MODEL_CONTEXT_LENGTH": str(CONTEXT_LENGTH), "RKLLMD_RUNNERS": "thread"}
    proc = FaultyDaemon("--backend", "cpu", env=env).start()
    yield proc
    proc.cleanup()


class Peer:
    def __init__(self, daemon: DaemonProcess):
        self.raw = RawPeer(daemon.socket)
        self.errors = documented_errors()
        self.inbox: list[dict[str, Any]] = []

    def send(self, request_id: Any, op: str, **fields: Any) -> None:
        self.raw.send(msgpack.packb({"v": 1, "id": request_id, "op": op, **fields}))

    def next(self, request_id: Any) -> dict[str, Any]:
        """The next message for ``request_id`` (others are kept for their own turn)."""
        for i, message in enumerate(self.inbox):
            if message["id"] == request_id:
                return self.inbox.pop(i)
        while True:
            message = self.raw.recv(timeout=120)
            assert message is not None, f"no message for {request_id!r}"
            check_envelope(message, self.errors)
            if message["id"] == request_id:
                return message
            self.inbox.append(message)

    def end_of(self, request_id: Any) -> dict[str, Any]:
        while (message := self.next(request_id))["type"] not in ("done", "error"):
            pass
        return message


def error_of(message: dict[str, Any], name: str) -> dict[str, Any]:
    assert message["type"] == "error" and message["error"]["name"] == name, message
    return message["error"]


def test_queue_full_and_cache_wait_timeout_while_the_worker_is_busy(faulty: DaemonProcess) -> None:
    peer = Peer(faulty)
    # Greedy, this prompt runs to max_tokens (sampled, "Count from one to five hundred." ended
    # after 18 tokens once, and the build then had the model to itself).
    peer.send("long", "generate", prompt="Count from one to five hundred, one number per line: 1, 2, 3, ...", max_tokens=200, temperature=0)
    assert peer.next("long")["type"] == "queued"
    # Until it starts it is the one waiting: the next would find the queue full.
    while (message := peer.next("long"))["type"] == "queued":
        pass
    assert message["type"] == "started"
    peer.send("waiting", "generate", prompt="Hi", max_tokens=1)
    assert peer.next("waiting")["type"] == "queued"
    peer.send("refused", "generate", prompt="Hi", max_tokens=1)  # max_queue = 1: one is waiting already
    assert "1" in error_of(peer.next("refused"), "queue_full")["message"]
    # A cache whose build waits behind the generations cannot be ready in 0.3 s.
    peer.send("put", "cache.put", name="busy", text="You answer in one word.")
    assert peer.next("put")["result"]["state"] in ("queued", "building")
    peer.send("wait", "cache.wait", name="busy", timeout=0.3)
    error_of(peer.next("wait"), "timeout")
    for target in ("waiting", "long"):
        peer.send(f"cancel-{target}", "cancel", target=target)
        peer.next(f"cancel-{target}")  # a result, or not_found had it just ended
        assert peer.end_of(target)["type"] == "done"
    peer.send("wait-again", "cache.wait", name="busy", timeout=120)
    assert peer.next("wait-again")["result"]["state"] == "ready"
    peer.raw.close()


def test_context_overflow_gives_the_prompt_length(faulty: DaemonProcess) -> None:
    peer = Peer(faulty)
    peer.send("big", "generate", prompt="word " * 400, max_tokens=4)
    error = error_of(peer.end_of("big"), "context_overflow")
    assert error["details"]["context_length"] == CONTEXT_LENGTH
    assert error["details"]["prompt_tokens"] > CONTEXT_LENGTH
    peer.raw.close()


def test_internal_errors_from_injected_faults_leave_the_daemon_serving(faulty: DaemonProcess) -> None:
    peer = Peer(faulty)
    with faulty.client() as client:
        errors_before = client.status()["counters"]["errors"]
    # On the prompt thread (rendering the prompt, after queued), on the model worker (inside
    # the stream, after queued and started), and on the disk thread (writing a text cache).
    peer.send("prompt", "generate", prompt="FAULT:render", max_tokens=1)
    stream = [peer.next("prompt") for _ in range(2)]
    assert [m["type"] for m in stream] == ["queued", "error"]
    assert "RuntimeError" in error_of(stream[-1], "internal")["message"]
    peer.send("worker", "generate", prompt="FAULT:start", max_tokens=1)
    stream = [peer.next("worker") for _ in range(3)]
    assert [m["type"] for m in stream] == ["queued", "started", "error"] and stream[-1]["seq"] == 2
    assert "RuntimeError" in error_of(stream[-1], "internal")["message"]
    peer.send("disk", "cache.put", name="fault-disk", text="x")
    error_of(peer.next("disk"), "internal")
    peer.raw.close()
    with faulty.client() as client:
        status = client.status()
        result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=48).wait()
    assert status["healthy"] is True and status["counters"]["errors"] == errors_before + 2
    assert result.text == "The capital of France is Paris."
    assert "fault injected by the test" in faulty.log()
