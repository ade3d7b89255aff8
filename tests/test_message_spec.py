"""Every reply of every operation, as the real daemon sends it, checked against the protocol
schema (rkllmd/schema.py), as ipykernel's message-spec test checks a kernel's messages."""

from __future__ import annotations

import os
from typing import Any

import msgpack

from conftest import DaemonProcess
from reliability import RawPeer
from rkllmd.schema import ENTRY, MODEL, OPERATIONS, PROTOCOL, STATS, STATUS, STREAM, STREAM_OPTIONAL

ENVELOPE = {"v", "id", "type"}


def matches_stream_schema(message: dict[str, Any], op: str = "generate") -> bool:
    """Every key the schema gives the message's type in ``op``'s stream, and no other (optional ones aside)."""
    keys, kind, stream = set(message) - ENVELOPE, message["type"], OPERATIONS[op].messages()
    if kind == "error":  # a stream's last message when it fails: its seq and the error
        return keys == {"seq", "error"} and {"code", "name", "message"} <= set(message["error"]) <= {"code", "name", "message", "details"}
    optional = set(STREAM_OPTIONAL.get(kind, ())) if stream is STREAM else set()
    return kind in stream and set(stream[kind]) <= keys <= set(stream[kind]) | optional


class SpecPeer:
    """A raw peer that checks each message it reads and records the operations it saw answered."""

    def __init__(self, daemon: DaemonProcess):
        self.peer = RawPeer(daemon.socket)
        self.answered: set[str] = set()
        self.ids = iter(range(1, 10**6))

    def send(self, op: str, **fields: Any) -> int:
        request_id = next(self.ids)
        self.peer.send(msgpack.packb({"v": 1, "id": request_id, "op": op, **fields}))
        return request_id

    def next(self, request_id: int) -> dict[str, Any]:
        message = self.peer.recv(timeout=60)
        assert message is not None, "no reply"
        assert message["id"] == request_id and message["v"] == 1, message
        return message

    def result(self, op: str, **fields: Any) -> dict[str, Any]:
        message = self.next(self.send(op, **fields))
        assert set(message) == ENVELOPE | {"result"} and message["type"] == "result", message
        assert set(message["result"]) == set(OPERATIONS[op].result), (op, sorted(message["result"]))
        self.answered.add(op)
        return message["result"]

    def error(self, op: str, **fields: Any) -> dict[str, Any]:
        message = self.next(self.send(op, **fields))
        assert set(message) == ENVELOPE | {"error"} and message["type"] == "error", message
        error = message["error"]
        assert {"code", "name", "message"} <= set(error) <= {"code", "name", "message", "details"}, error
        return error

    def stream(self, request_id: int, cancel: bool = False, op: str = "generate") -> list[dict[str, Any]]:
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            message = self.next(request_id)
            assert ENVELOPE <= set(message) and matches_stream_schema(message, op), message
            assert message["seq"] == len(messages), message
            messages.append(message)
            if cancel and len(messages) == 1:
                cancel_id = self.send("cancel", target=request_id)
                reply = self.peer.recv(timeout=60)
                while reply["id"] != cancel_id:  # the stream's next messages may come first
                    assert reply["id"] == request_id and matches_stream_schema(reply, op), reply
                    assert reply["seq"] == len(messages)
                    messages.append(reply)
                    reply = self.peer.recv(timeout=60)
                if reply["type"] == "result":
                    assert set(reply["result"]) == set(OPERATIONS["cancel"].result), reply
                    self.answered.add("cancel")
        return messages


def test_every_reply_of_every_operation_matches_the_schema(daemon: DaemonProcess) -> None:
    name = f"spec-{os.getpid()}"
    # A system prompt no other test sends: the shared daemon keeps conversation states, and
    # one with the same system message would supply more of the prompt than the cache.
    system = f"You are terse ({name})."
    spec = SpecPeer(daemon)
    try:
        assert spec.result("ping")["protocol"] == list(PROTOCOL)
        status = spec.result("status")
        assert status["protocol"] == list(PROTOCOL) and set(status) == set(STATUS)
        assert set(spec.result("cache.put", name=name, text=system)) == set(ENTRY)
        spec.result("cache.wait", name=name, timeout=120)
        shown = spec.result("cache.show", name=name)
        assert shown["text"] == system and shown["error"] is None
        listing = spec.result("cache.ls")
        assert all(set(entry) == set(ENTRY) | {"in_memory"} for entry in listing["caches"] if entry["name"] == name)
        assert spec.result("cache.rebuild", name=name)["queued"] == [name]
        spec.result("cache.wait", name=name, timeout=120)

        messages = spec.stream(spec.send("generate", prompt="Say hi.", cache=name, max_tokens=4))
        assert [m["type"] for m in messages[:2]] == ["queued", "started"] and messages[-1]["type"] == "done"
        kinds = [m["type"] for m in messages[2:-1]]
        assert set(kinds) <= {"progress", "token"} and kinds == sorted(kinds), kinds  # prefill progress, then text
        assert all(m["phase"] == "prefill" and 0 < m["done"] <= m["total"] for m in messages if m["type"] == "progress")
        done = messages[-1]
        assert set(done["stats"]) == set(STATS) and done["cache"] == name, done

        messages = spec.stream(spec.send("generate", messages=[{"role": "user", "content": "Count to one hundred."}], max_tokens=200), cancel=True)
        assert messages[-1]["type"] == "done" and messages[-1]["finish_reason"] in ("cancelled", "length", "stop")

        embedded = spec.result("embed", input=["Say hi.", "Say bye."])
        assert embedded["dimensions"] == 576 and [len(e) for e in embedded["embeddings"]] == [576 * 4] * 2  # float32 bins

        model = f"spec-model-{os.getpid()}"
        listing = spec.result("models")
        assert all(set(entry) == set(MODEL) for entry in listing["models"]) and listing["loaded"], listing
        default = listing["default"]
        assert set(spec.result("create", name=model, **{"from": default}, system="You are terse.")) == set(MODEL)
        assert set(spec.result("copy", source=model, destination=model + "-copy")) == set(MODEL)
        assert spec.result("load", model=model) == {"model": model, "loaded": True}
        for removed in (model + "-copy", model):
            assert set(spec.result("delete", name=removed)) == set(MODEL)
        assert spec.error("delete", name=model)["name"] == "not_found"

        rendered = spec.result("render", messages=[{"role": "user", "content": "Say hi."}])
        assert rendered["text"].endswith("<|im_start|>assistant\n") and rendered["tokens"] > 0, rendered

        # A pull cancelled at once (no hub is needed): its first status, then done, cancelled;
        # or, where the hub cannot be reached, its error may come before the cancel does.
        messages = spec.stream(spec.send("pull", source="hf.co/rkllmd-tests/nothing"), cancel=True, op="pull")
        assert messages[0]["status"] == "pulling manifest", messages
        last = messages[-1]
        assert last["type"] == "done" and last["finish_reason"] == "cancelled" or last["type"] == "error" and last["error"]["name"] == "hub", messages
        spec.answered.add("pull")

        error = spec.error("cache.show", name="spec-none")
        assert error["name"] == "not_found"
        assert spec.result("cache.rm", name=name) == {"name": name, "removed": True}
        spec.answered.add("generate")
    finally:
        spec.peer.close()
        with daemon.client() as client:
            if any(entry["name"] == name for entry in client.cache_ls()["caches"]):
                client.cache_rm(name)
    assert spec.answered == set(OPERATIONS), set(OPERATIONS) - spec.answered
