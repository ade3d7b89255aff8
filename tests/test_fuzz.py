"""Protocol fuzzing against the real daemon (issue 6, item 1).

Thousands of generated and mutated messages: random bytes, truncated, spliced and
bit-flipped requests, deep nesting, a wrong type or an out-of-range value in every field
of every operation, unknown versions and operations, huge strings, arrays and maps, extra
and empty frames. Each is answered with the error a reference model of docs/protocol.md
predicts (a documented code, in the documented envelope, with the request's id when it
was readable) or, for messages over 16 MiB, dropped unread as the document says. Then
the daemon still answers status, still generates the reference greedy answer, has
counted every message, and its resident memory has not grown by more than a few MB.

Deterministic (``derandomize``): every CI run sends the same messages.
"""

from __future__ import annotations

import random
import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DaemonProcess
from reliability import RawPeer, check_envelope, documented_errors, figures_fixture, rss_kb
from rkllmd.schema import OPERATIONS, Setting

figures = figures_fixture()

MIB = 1 << 20
MAX_MESSAGE = MIB  # docs/protocol.md: "A message over 1 MiB is answered too_large"
HARD_LIMIT = 16 * MIB  # "... one over 16 MiB is not read at all"
MAX_DEPTH = 16
MAX_ARRAY, MAX_MAP = 1 << 16, 1 << 12
MAX_PROMPT_CHARS = 262144
MIN_MESSAGES = 5000
#: Messages each family must have sent at full scale (hypothesis may stop a family early
#: when its examples run out; a family that shrank would otherwise pass unnoticed).
MIN_PER_FAMILY = {
    "random_bytes": 1000, "mutated": 1500, "deep": 140, "wrong_field": 2000,
    "envelope": 650, "frames": 450, "huge": 55, "free_form": 380,
}
RSS_GROWTH_LIMIT_KB = 6 * 1024

MALFORMED, UNSUPPORTED_VERSION, UNKNOWN_OP, INVALID_FIELD, TOO_LARGE, INVALID_NAME = 100, 101, 102, 103, 104, 106
#: The daemon's defaults where a field's bound is a setting (docs/protocol.md, etc/rkllmd.toml).
SETTINGS = {"daemon.max_tokens_limit": 4096}
_FUZZ_KINDS = {"str": "str", "name": "str", "int": "int", "float": "float", "bool": "bool", "id": "target", "messages": "messages", "stops": "stop", "tools": "tools", "vars": "vars", "format": "format", "tool_choice": "tool_choice",
               "embed_input": "embed_input", "parameters": "parameters", "keep_alive": "keep_alive"}


def _bound(value: Any) -> Any:
    return SETTINGS[value.key] if isinstance(value, Setting) else value


# Every operation's fields, from the protocol schema: kind, required, and range.
KNOWN_OPS = sorted(OPERATIONS)
FIELDS: dict[str, dict[str, tuple]] = {
    op.name: {
        f.name: (_FUZZ_KINDS[f.kind], f.required or f.name == (op.one_of or ("",))[0], *((_bound(f.low), _bound(f.high)) if f.kind in ("int", "float") else ()))
        for f in op.fields
    }
    for op in OPERATIONS.values()
}
# Valid except for what a test changes; none of them starts work or writes a file once a
# field is wrong (names that do not exist, a cancel of nothing).
BASE: dict[str, dict[str, Any]] = {
    "generate": {"prompt": "Hi", "max_tokens": 1},
    "render": {"messages": [{"role": "user", "content": "Hi"}]},
    "cancel": {"target": "nothing-running"},
    "status": {}, "ping": {}, "cache.ls": {},
    "cache.show": {"name": "fz-none"},
    "cache.put": {"name": "fz-none", "text": "x"},
    "cache.rm": {"name": "fz-none"},
    "cache.rebuild": {"name": "fz-none"},
    "cache.wait": {"name": "fz-none", "timeout": 0},
    "embed": {"input": "Hi"},
    # Models that do not exist: nothing is created or removed, whatever else is sent.
    "models": {}, "load": {},
    "create": {"name": "fz-model", "from": "fz-none"},
    "copy": {"source": "fz-none", "destination": "fz-copy"},
    "delete": {"name": "fz-none"},
    "pull": {"source": "fz-none"},  # not a hub path: refused before any download
}
assert sorted(FIELDS) == KNOWN_OPS == sorted(BASE)

# -- strategies ---------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
SCALARS = st.none() | st.booleans() | INT64 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24) | st.binary(max_size=24)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def wrong_values(spec: tuple) -> st.SearchStrategy:
    """Values the field must refuse with invalid_field: wrong types, out of range, malformed items."""
    kind, required = spec[0], spec[1]
    not_none = (lambda v: True) if required else (lambda v: v is not None)  # None stands for "absent"
    if kind == "str":
        return VALUES.filter(lambda v: not isinstance(v, str) and not_none(v))
    if kind == "bool":
        return VALUES.filter(lambda v: not isinstance(v, bool) and not_none(v))
    if kind == "target":
        return VALUES.filter(lambda v: (isinstance(v, bool) or not isinstance(v, (str, int))) and not_none(v))
    if kind in ("int", "float"):
        low, high = spec[2], spec[3]
        wrong_type = VALUES.filter(lambda v: not _is_number(v) and not_none(v) if kind == "float" else not (isinstance(v, int) and not isinstance(v, bool)) and not_none(v))
        below = st.integers(-(2**63), low - 1) if low > -(2**63) else st.nothing()
        above = st.integers(high + 1, 2**64 - 1) if high < 2**64 - 1 else st.nothing()
        out = below | above
        if kind == "float":
            out = out | st.floats(allow_nan=True).filter(lambda f: f != f or not low <= f <= high)
        return wrong_type | out
    if kind == "messages":
        role = st.sampled_from(["system", "user", "assistant", "tool"])
        good = st.fixed_dictionaries({"role": role, "content": st.text(max_size=10)})
        bad_item = st.one_of(
            VALUES.filter(lambda v: not isinstance(v, dict)),
            st.fixed_dictionaries({"role": VALUES.filter(lambda r: r not in ("system", "user", "assistant", "tool")), "content": st.text(max_size=5)}),
            st.fixed_dictionaries({"role": role, "content": VALUES.filter(lambda c: not isinstance(c, str))}),
        )
        return st.one_of(
            VALUES.filter(lambda v: not isinstance(v, list) and v is not None),
            st.just([]),
            st.builds(lambda items, bad, at: items[:at] + [bad] + items[at:], st.lists(good, max_size=3), bad_item, st.integers(0, 3)),
            st.just([{"role": "user", "content": "x"}] * 1025),
        )
    if kind == "stop":
        return st.one_of(
            VALUES.filter(lambda v: not isinstance(v, list) and v is not None),
            st.lists(st.text(min_size=1, max_size=4), min_size=17, max_size=20),
            st.lists(VALUES.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3),
            st.just([""]),
            st.builds(lambda n: ["x" * n], st.integers(257, 400)),
        )
    if kind == "tools":
        function = st.fixed_dictionaries({"name": st.text(min_size=1, max_size=8)})
        bad_tool = st.one_of(
            VALUES.filter(lambda v: not isinstance(v, dict)),
            st.fixed_dictionaries({"type": VALUES.filter(lambda t: t != "function"), "function": function}),
            st.fixed_dictionaries({"type": st.just("function"), "function": VALUES.filter(lambda f: not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"])}),
            st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.just("f"), "parameters": VALUES.filter(lambda p: not isinstance(p, dict) and p is not None)})}),
        )
        return st.one_of(
            VALUES.filter(lambda v: not isinstance(v, list) and v is not None),
            st.lists(bad_tool, min_size=1, max_size=3),
            st.just([{"type": "function", "function": {"name": "f"}}] * 129),
        )
    if kind == "format":  # "json" or a map (a map the engine rejects is tested in test_constrained.py)
        return VALUES.filter(lambda v: v != "json" and not isinstance(v, dict) and v is not None)
    if kind == "tool_choice":
        def named(v: Any) -> bool:
            function = v.get("function") if isinstance(v, dict) else None
            return isinstance(function, dict) and isinstance(function.get("name"), str) and bool(function["name"])
        return VALUES.filter(lambda v: v not in ("auto", "none", "required") and not named(v) and v is not None)
    if kind == "vars":
        return st.one_of(
            VALUES.filter(lambda v: not isinstance(v, dict) and v is not None),
            st.dictionaries(st.text(max_size=8).filter(lambda k: not k.isidentifier() or not k.isascii()), SCALARS, min_size=1, max_size=3),
            st.sampled_from(["messages", "tools", "add_generation_prompt", "raise_exception"]).map(lambda k: {k: 1}),
            st.just({f"v{i}": i for i in range(65)}),
        )
    if kind == "embed_input":  # a text, texts, token ids, or lists of token ids
        return st.one_of(
            VALUES.filter(lambda v: not isinstance(v, (str, list)) and v is not None),
            st.sampled_from(["", [], [[]], [""], "a\x00b", [["t"]], [1.5]]),
            st.lists(st.integers(-(2**63), -1), min_size=1, max_size=3),
            st.lists(VALUES.filter(lambda v: not isinstance(v, (str, list, int))), min_size=1, max_size=3),
            st.just(["x"] * 2049),
        )
    if kind == "parameters":
        return VALUES.filter(lambda v: not isinstance(v, dict) and v is not None)
    if kind == "keep_alive":  # a number of seconds or a duration
        return VALUES.filter(lambda v: (isinstance(v, bool) or not isinstance(v, (str, int, float))) and v is not None)
    raise AssertionError(kind)


VALID_IDS = st.text(max_size=128) | INT64
BAD_IDS = st.one_of(st.none(), st.booleans(), st.floats(), st.binary(max_size=8), st.lists(SCALARS, max_size=2),
                    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2), st.text(min_size=129, max_size=200))
BAD_VERSIONS = VALUES.filter(lambda v: not (type(v) is int and v == 1))
BAD_OPS = VALUES.filter(lambda v: not (isinstance(v, str) and v in KNOWN_OPS))
HOSTILE_NAMES = st.one_of(
    st.sampled_from(["", ".", "..", ".hidden", "a/b", "../x", "/etc/passwd", "a\x00b", "x" * 65, "a..b", "a\\b", "con:", "~root"]),
    st.text(min_size=1, max_size=80).filter(lambda s: not (len(s) <= 64 and s[0] != "." and ".." not in s and all(c.isascii() and (c.isalnum() or c in "-_.") for c in s))),
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- the reference model of docs/protocol.md's envelope rules ---------------------------------
# Written from the msgpack specification (github.com/msgpack/msgpack/blob/master/spec.md) and
# docs/protocol.md, not from the daemon's decoder: a message is one msgpack object, a map
# whose keys are strings, no ext types, at most 16 levels deep (the message is level 1, what
# a map or an array holds one level more), no array over 65,536 items, no map over 4,096 keys.

class Refused(Exception):
    """The reference model calls the message malformed."""


def decode(data: bytes) -> Any:
    value, end = _decode(data, 0, 1)
    if end != len(data):
        raise Refused("bytes after the message")
    return value


def _take(data: bytes, at: int, n: int) -> tuple[bytes, int]:
    if at + n > len(data):
        raise Refused("truncated")
    return data[at:at + n], at + n


def _uint(data: bytes, at: int, n: int) -> tuple[int, int]:
    raw, at = _take(data, at, n)
    return int.from_bytes(raw, "big"), at


def _decode(data: bytes, at: int, level: int) -> tuple[Any, int]:
    if level > MAX_DEPTH:
        raise Refused("too deep")
    raw, at = _take(data, at, 1)
    b = raw[0]
    if b <= 0x7F:
        return b, at
    if b >= 0xE0:
        return b - 0x100, at
    if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
        n, at = (b & 0x1F, at) if b <= 0xBF else _uint(data, at, 1 << (b - 0xD9))
        raw, at = _take(data, at, n)
        try:
            return raw.decode("utf-8"), at
        except UnicodeDecodeError:
            raise Refused("a str that is not UTF-8") from None
    if b in (0xC4, 0xC5, 0xC6):
        n, at = _uint(data, at, 1 << (b - 0xC4))
        return _take(data, at, n)
    if b in (0xC0, 0xC2, 0xC3):
        return {0xC0: None, 0xC2: False, 0xC3: True}[b], at
    if b in (0xCA, 0xCB):
        raw, at = _take(data, at, 4 if b == 0xCA else 8)
        return struct.unpack(">f" if b == 0xCA else ">d", raw)[0], at
    if 0xCC <= b <= 0xD3:
        raw, at = _take(data, at, 1 << ((b - 0xCC) % 4))
        return int.from_bytes(raw, "big", signed=b >= 0xD0), at
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        n, at = (b & 0x0F, at) if b <= 0x9F else _uint(data, at, 2 if b == 0xDC else 4)
        if n > MAX_ARRAY:
            raise Refused("array too long")
        items = []
        for _ in range(n):
            item, at = _decode(data, at, level + 1)
            items.append(item)
        return items, at
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        n, at = (b & 0x0F, at) if b <= 0x8F else _uint(data, at, 2 if b == 0xDE else 4)
        if n > MAX_MAP:
            raise Refused("map too large")
        result = {}
        for _ in range(n):
            key, at = _decode(data, at, level + 1)
            if not isinstance(key, (str, bytes)):
                raise Refused("a map key that is not a string")
            result[key], at = _decode(data, at, level + 1)
        return result, at
    raise Refused(f"ext type or reserved byte 0x{b:02x}")  # 0xc1, 0xc7-0xc9, 0xd4-0xd8


def expected(data: bytes) -> tuple[int | None, Any, Any]:
    """(error code the envelope must get, or None if it passes; the id the reply must carry; the request)."""
    if len(data) > MAX_MESSAGE:
        return TOO_LARGE, None, None
    try:
        request = decode(data)
    except Refused:
        return MALFORMED, None, None
    if not isinstance(request, dict):
        return MALFORMED, None, None
    rid = request.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or isinstance(rid, str) and len(rid) > 128:
        return INVALID_FIELD, None, request
    if not (type(request.get("v")) is int and request["v"] == 1):
        return UNSUPPORTED_VERSION, rid, request
    if not isinstance(request.get("op"), str) or request["op"] not in KNOWN_OPS:
        return UNKNOWN_OP, rid, request
    return None, rid, request


# -- the fuzzing session --------------------------------------------------------------------------

class Session:
    """One raw peer, every exchange checked, everything counted."""

    def __init__(self, proc: DaemonProcess):
        self.proc = proc
        self.peer = RawPeer(proc.socket)
        self.errors = documented_errors()
        self.sent = 0
        self.error_replies = 0
        self.by_code: dict[int, int] = {}

    def exchange(self, frames: list[bytes]) -> dict[str, Any]:
        """Send one message; return its (checked) reply; a generation it started is cancelled at once."""
        self.peer.send(*frames)
        self.sent += 1
        reply = self.peer.recv(timeout=30)
        assert reply is not None, f"no reply to {frames!r:.200}"
        check_envelope(reply, self.errors)
        if reply["type"] == "error":
            self.error_replies += 1
            self.by_code[reply["error"]["code"]] = self.by_code.get(reply["error"]["code"], 0) + 1
        elif reply["type"] == "queued":
            self._cancel(reply["id"])
        else:
            assert reply["type"] == "result", reply
        return reply

    def _cancel(self, target: Any) -> None:
        """A generation the fuzzer started by chance: cancel it and read its stream to the end."""
        self.peer.send(pack({"v": 1, "id": "fuzz-cancel", "op": "cancel", "target": target}))
        self.sent += 1
        deadline = time.monotonic() + 60
        ended = answered = False
        while not (ended and answered):
            message = self.peer.recv(timeout=max(0.1, deadline - time.monotonic()))
            assert message is not None, "a cancelled generation did not end"
            check_envelope(message, self.errors)
            if message["id"] == "fuzz-cancel":
                answered = True
                if message["type"] == "error":  # it had finished already
                    assert message["error"]["code"] == 201, message
                    self.error_replies += 1
            elif message["id"] == target:
                ended = message["type"] in ("done", "error")
                if message["type"] == "error":
                    self.error_replies += 1

    def expect(self, data: bytes, extra_frames: list[bytes] | None = None) -> dict[str, Any]:
        """Send ``data``; the reply must be what the reference model predicts for the envelope."""
        reply = self.exchange([data, *(extra_frames or [])])
        code, rid, _ = expected(data)
        if extra_frames:
            code, rid = MALFORMED, None
        if code is not None:
            assert reply["type"] == "error" and reply["error"]["code"] == code, (data[:200], reply)
            assert reply["id"] == rid, (data[:200], reply)
        elif reply["type"] == "error":
            assert reply["id"] == rid, (data[:200], reply)
        return reply

    def expect_field_error(self, op: str, field: str, value: Any, request_id: Any) -> None:
        request = {"v": 1, "id": request_id, "op": op, **BASE[op], field: value}
        if field == "messages" and op == "generate":
            del request["prompt"]  # else "give either 'messages' or 'prompt'" answers before the value is looked at
        reply = self.exchange([pack(request)])
        assert reply["type"] == "error", (request, reply)
        assert reply["error"]["code"] == INVALID_FIELD and reply["id"] == request_id, (request, reply)
        assert reply["error"].get("details", {}).get("field") == field, (request, reply)


FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False)


def fuzz(session: Session, scale: float) -> dict[str, int]:
    """Every family of hostile message; ``scale`` multiplies the number of examples.
    Returns the messages sent per family."""

    def n(count: int) -> int:
        return max(1, int(count * scale))

    @settings(FUZZ, max_examples=n(700))
    @given(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
    def random_bytes(blobs: list[bytes]) -> None:
        for blob in blobs:
            session.expect(blob)

    valid = [pack({"v": 1, "id": i, "op": op, **BASE[op]}) for i, op in enumerate(KNOWN_OPS) if op not in ("generate", "cache.put")]
    valid += [pack({"v": 1, "id": "g", "op": "generate", "prompt": "Hi", "max_tokens": "1"})]  # wrong only in max_tokens

    @settings(FUZZ, max_examples=n(800))
    @given(st.sampled_from(valid), st.lists(st.tuples(st.sampled_from(["cut", "flip", "insert", "delete", "append"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
    def mutated(data: bytes, edits: list[tuple[str, int, bytes]]) -> None:
        for how, at, junk in edits:
            at = at % max(1, len(data))
            if how == "cut":
                data = data[:at]
            elif how == "flip":
                data = data[:at] + bytes([data[at] ^ junk[0]]) + data[at + 1:] if data else junk
            elif how == "insert":
                data = data[:at] + junk + data[at:]
            elif how == "delete":
                data = data[:at] + data[at + len(junk):]
            else:
                data = data + junk
            session.expect(data)

    @settings(FUZZ, max_examples=n(150))
    @given(st.integers(MAX_DEPTH + 1, 3000), st.sampled_from(["list", "map"]), st.sampled_from(["status", "generate", "cache.ls"]))
    def deep(depth: int, container: str, op: str) -> None:
        # Built by hand: msgpack's own packer refuses to nest this deep.
        nested = (b"\x91" if container == "list" else b"\x81\xa1k") * depth + b"\x01"
        head = {"v": 1, "id": "deep", "op": op}
        data = b"\x84" + b"".join(pack(k) + pack(v) for k, v in head.items()) + pack("x") + nested
        reply = session.expect(data)
        assert reply["error"]["code"] == MALFORMED

    cases = [(op, field) for op, fields in FIELDS.items() for field in fields]

    @settings(FUZZ, max_examples=n(1400))
    @given(st.data())
    def wrong_field(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 3))):
            op, field = data.draw(st.sampled_from(cases))
            value = data.draw(wrong_values(FIELDS[op][field]))
            session.expect_field_error(op, field, value, data.draw(VALID_IDS))

    @settings(FUZZ, max_examples=n(700))
    @given(st.sampled_from(KNOWN_OPS), st.sampled_from(["id", "v", "op", "name"]), st.data())
    def envelope(op: str, what: str, data: st.DataObject) -> None:
        request = {"v": 1, "id": data.draw(VALID_IDS), "op": op, **BASE[op]}
        if what == "id":
            request["id"] = data.draw(BAD_IDS)
        elif what == "v":
            request["v"] = data.draw(BAD_VERSIONS)
        elif what == "op":
            request["op"] = data.draw(BAD_OPS)
        else:
            op = request["op"] = data.draw(st.sampled_from(["cache.show", "cache.put", "cache.rm", "cache.rebuild", "cache.wait"]))
            request.update(BASE[op], name=data.draw(HOSTILE_NAMES))
        reply = session.expect(pack(request))
        if what == "name":
            assert reply["type"] == "error" and reply["error"]["code"] == INVALID_NAME, (request, reply)
        if what == "v":
            assert reply["error"]["details"]["supported"] == [1]
        if what == "op":
            assert sorted(reply["error"]["details"]["known"]) == KNOWN_OPS

    @settings(FUZZ, max_examples=n(250))
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.booleans())
    def frames(extra: list[bytes], req_style: bool) -> None:
        good = pack({"v": 1, "id": "f", "op": "ping"})
        if req_style:  # a REQ socket's empty delimiter before the message
            session.expect(b"", [good])
        else:
            session.expect(good, extra)
        session.expect(b"")

    @settings(FUZZ, max_examples=n(60))
    @given(st.sampled_from(["big-field", "prompt", "array", "map", "messages"]), st.integers(0, 4000))
    def huge(kind: str, delta: int) -> None:
        if kind == "big-field":  # around the 1 MiB limit, in a key the daemon ignores
            request = {"v": 1, "id": "h", "op": "status", "pad": ""}
            overhead = len(pack(request)) + 4
            request["pad"] = "x" * (MAX_MESSAGE - overhead - 2000 + delta)
            reply = session.expect(pack(request))
            assert reply["type"] == ("error" if len(pack(request)) > MAX_MESSAGE else "result")
        elif kind == "prompt":
            reply = session.expect(pack({"v": 1, "id": "h", "op": "generate", "prompt": "y" * (MAX_PROMPT_CHARS + 1 + delta)}))
            assert reply["error"]["code"] == TOO_LARGE
        elif kind == "array":
            reply = session.expect(pack({"v": 1, "id": "h", "op": "status", "x": [0] * (MAX_ARRAY + 1 + delta)}))
            assert reply["error"]["code"] == MALFORMED
        elif kind == "map":
            reply = session.expect(pack({"v": 1, "id": "h", "op": "status", "x": {str(i): 0 for i in range(MAX_MAP + 1 + delta)}}))
            assert reply["error"]["code"] == MALFORMED
        else:
            session.expect_field_error("generate", "messages", [{"role": "user", "content": "x"}] * (1025 + delta), "h")

    free_ops = [op for op in KNOWN_OPS if op != "cache.put"]  # valid puts would write files: see wrong_field

    @settings(FUZZ, max_examples=n(400))
    @given(st.sampled_from(free_ops), st.data())
    def free_form(op: str, data: st.DataObject) -> None:
        """Any mix of an operation's fields with any values: whatever comes back is documented."""
        request: dict[str, Any] = {"v": 1, "id": data.draw(VALID_IDS), "op": op}
        for field in data.draw(st.lists(st.sampled_from(sorted(FIELDS[op]) + ["extra"]), max_size=4, unique=True)):
            request[field] = data.draw(VALUES)
        if op == "cache.wait" and _is_number(request.get("timeout")):
            request["timeout"] = min(request["timeout"], 0.1)  # a valid wait must not hold the fuzzer
        session.expect(pack(request))

    sent = {}
    for family in (random_bytes, mutated, deep, wrong_field, envelope, frames, huge, free_form):
        before = session.sent
        family()
        sent[family.__name__] = session.sent - before
    return sent


def pipelined(session: Session, count: int) -> None:
    """``count`` requests sent before reading any reply: every one answered once (replies
    are matched by id: a status is gathered off the socket loop, so a later ping may
    overtake it)."""
    for i in range(count):
        session.peer.send(pack({"v": 1, "id": i, "op": "ping" if i % 3 else "status"}))
    session.sent += count
    answered = []
    for i in range(count):
        reply = session.peer.recv(timeout=30)
        assert reply is not None, f"reply {i} of {count} pipelined requests is missing"
        check_envelope(reply, session.errors)
        assert reply["type"] == "result" and ("pong" in reply["result"]) == bool(reply["id"] % 3), reply
        answered.append(reply["id"])
    assert sorted(answered) == list(range(count))


@pytest.fixture(scope="module")
def fuzz_daemon() -> DaemonProcess:
    proc = DaemonProcess("--backend", "cpu", "--log-level", "warning").start()
    yield proc
    proc.cleanup()


def test_thousands_of_hostile_messages_get_documented_answers(fuzz_daemon: DaemonProcess, figures) -> None:
    proc = fuzz_daemon
    pid = proc.proc.pid
    session = Session(proc)
    with proc.client() as client:
        # Warm-up: the first generation makes the model's whole KV cache resident (~190 MB).
        client.generate("Hi", max_tokens=1).wait()
        before = client.status()["counters"]
    started = time.monotonic()
    fuzz(session, scale=0.08)  # warm-up: every code path once, before the memory baseline
    pipelined(session, 200)
    baseline_kb = rss_kb(pid)
    per_family = fuzz(session, scale=1.0)
    pipelined(session, 2000)
    elapsed = time.monotonic() - started
    after_kb = rss_kb(pid)
    session.peer.close()

    with proc.client() as client:
        status = client.status()
        result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=48, temperature=0).wait()
    counters = status["counters"]
    assert status["healthy"] is True and status["worker"]["queued"] == 0
    assert result.text == "The capital of France is Paris."
    # Every message was read and answered: the daemon counted exactly what we sent.
    assert counters["requests"] - before["requests"] == session.sent + 1  # + the status request itself
    assert counters["errors_sent"] - before["errors_sent"] == session.error_replies
    assert counters["replies_dropped"] == 0
    assert session.sent >= MIN_MESSAGES, session.sent
    growth_kb = after_kb - baseline_kb
    figures.record("fuzz", messages=session.sent, error_replies=session.error_replies, seconds=round(elapsed, 1),
                   rss_baseline_mb=round(baseline_kb / 1024, 1), rss_growth_kb=growth_kb,
                   codes=dict(sorted(session.by_code.items())), per_family=per_family)
    short = {family: n for family, n in per_family.items() if n < MIN_PER_FAMILY[family]}
    assert not short, f"families that sent fewer messages than their minimum {MIN_PER_FAMILY}: {short}"
    assert growth_kb <= RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth_kb} KiB over {session.sent} messages"


def test_messages_over_16_mib_are_dropped_unread(fuzz_daemon: DaemonProcess, figures) -> None:
    proc = fuzz_daemon
    rng = random.Random(6)
    with proc.client() as client:
        before = client.status()["counters"]["requests"]
    sizes = [HARD_LIMIT + 1, HARD_LIMIT + rng.randrange(1, MIB), 3 * HARD_LIMIT]
    for size in sizes:
        peer = RawPeer(proc.socket)
        try:
            peer.send(bytes(size))  # one frame, never read
            assert peer.recv(timeout=1.5) is None, "a message over 16 MiB was answered"
            # The connection was dropped, not the peer: ZeroMQ reconnects and it is served again.
            peer.send(pack({"v": 1, "id": "p", "op": "ping"}))
            reply = peer.recv(timeout=15)
            assert reply is not None and reply["id"] == "p" and reply["type"] == "result", reply
        finally:
            peer.close()
    with proc.client() as client:
        status = client.status()
    # Nothing of the huge messages was read: only the pings (and this status) arrived.
    assert status["counters"]["requests"] - before == len(sizes) + 1
    assert status["healthy"] is True
    figures.record("fuzz-over-16MiB", messages=len(sizes), answered=0, daemon_requests_counted=0)

