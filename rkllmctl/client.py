"""A small client for rkllmd's socket (protocol: docs/protocol.md).

One Client holds one DEALER socket and is meant for one thread. Replies are matched to
requests by id, so a ``cancel`` can be sent while a generation streams. Requests are
made from the protocol schema (rkllmd/schema.py): an operation or field it does not
declare is a bug here, refused before anything is sent. Anything the daemon sends that
the protocol does not allow (not msgpack, not a map, a type of message it does not
have, a gap in a stream's ``seq``) is a ProtocolViolation.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from rkllmd.paths import default_socket
from rkllmd.protocol import PROTOCOL_VERSION, WireError, pack, unpack
from rkllmd.schema import OPERATIONS, REPLY_TYPES

from .errors import DaemonError, DaemonUnreachable, PermissionDenied, ProtocolViolation

#: After the daemon closed the connection, how long to wait for replies it sent before.
LINGER_READ_S = 0.2
#: How long the connection probe retries a daemon whose backlog of new connections is full.
PROBE_BUSY_S = 2.0
START_HINT = "start it with `rkllmd` (or `systemctl start rkllmd`), or point --socket / RKLLMD_SOCKET at a running one"


@dataclass
class GenerationResult:
    """The end of a generation: all its text, why it stopped, and the daemon's stats.

    ``text`` is the answer only: never the reasoning, never the text of a parsed tool call
    (which is in ``tool_calls``, OpenAI's shape, ``arguments`` a JSON string). A tool call
    that did not parse stays in ``text``, and ``tool_call_error`` says why.
    """

    text: str
    finish_reason: str
    stats: dict[str, Any] | None
    cache: str | None
    reason: str | None = None
    client_ttft_ms: float | None = None  # measured here, from sending to the first text
    messages: int = 0  # stream messages received (tokens are coalesced when the reader is slow)
    reasoning: str | None = None  # None: the output had no reasoning block (protocol 1.2)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_error: str | None = None
    #: Each generated token's log-probabilities, in order, when the request asked for them
    #: (protocol 1.6): ``{"token", "logprob", "bytes", "top_logprobs": [...]}``.
    logprobs: list[dict[str, Any]] = field(default_factory=list)


def probe(path: Path) -> None:
    """Fail fast, with advice, when nothing can answer at ``path`` (ZeroMQ would wait forever).

    A daemon whose listen backlog is full (hundreds of clients connecting at once) makes
    connect(2) fail with EAGAIN at once: that is busy, not absent, so retry for a while.
    """
    deadline = time.monotonic() + PROBE_BUSY_S
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(PROBE_BUSY_S)
        try:
            s.connect(os.fspath(path))
            return
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise DaemonUnreachable(f"{path} is too busy: its queue of new connections stayed full for {PROBE_BUSY_S:.0f} s") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(
                    f"permission denied on {path}: only members of group rkllm may use rkllmd "
                    "(sudo usermod -aG rkllm $USER, then log in again)"
                ) from None
            if exc.errno == errno.ENOENT:
                raise DaemonUnreachable(f"no rkllmd socket at {path}; {START_HINT}") from None
            if exc.errno == errno.ECONNREFUSED:
                raise DaemonUnreachable(f"nothing listens on {path} (a stale socket?); {START_HINT}") from None
            raise DaemonUnreachable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        finally:
            s.close()


class Client:
    """``with Client() as c: print(c.status())``

    ``timeout`` bounds the wait for the first reply to each request (connection
    problems, a hung daemon); a running stream may then take as long as it takes.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0):
        self.path = Path(socket_path) if socket_path else default_socket(client=True)
        self.timeout = timeout
        probe(self.path)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # ZeroMQ reconnects silently to a restarted daemon that never heard of our
        # request; the monitor tells us the connection dropped, so a wait cannot hang.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._disconnected = False
        self._sock.connect(f"ipc://{self.path}")
        self._ids = itertools.count(1)
        self._pending: dict[Any, deque[dict[str, Any]]] = defaultdict(deque)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    # -- plumbing --------------------------------------------------------------------

    def send(self, op: str, **fields: Any) -> Any:
        """Send one request; return its id."""
        check_fields(op, fields)
        request_id = next(self._ids)
        data = encode_request(op, request_id, fields)
        while self._monitor.poll(0):  # a drop before this request is no concern of it
            recv_monitor_message(self._monitor)
        self._disconnected = False
        self._sock.send(data)
        return request_id

    def receive(self, request_id: Any, timeout: float | None) -> dict[str, Any]:
        """The next message for ``request_id``; others are kept for their own readers."""
        if self._pending[request_id]:
            return self._pending[request_id].popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._disconnected:  # what it sent before closing is still read first
                wait = LINGER_READ_S if wait is None else min(wait, LINGER_READ_S)
            ready = dict(self._poller.poll(None if wait is None else int(wait * 1000) + 1))
            if self._monitor in ready and recv_monitor_message(self._monitor)["event"] == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
                continue
            if self._sock not in ready:
                if self._disconnected:
                    raise DaemonUnreachable(f"rkllmd at {self.path} closed the connection (stopped or restarted); the request is lost")
                if deadline is not None and time.monotonic() >= deadline:
                    raise DaemonUnreachable(f"no answer from {self.path} within {timeout:g} s; is rkllmd hung or busy loading?")
                continue
            message = decode_reply(self._sock.recv())
            if message.get("id") == request_id:
                return message
            if message.get("id") is None and message.get("type") == "error":
                raise_error(message)  # the daemon could not even read our request
            self._pending[message.get("id")].append(message)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """A one-shot request: its result map, or DaemonError."""
        return self.result_of(self.send(op, **fields), self.timeout)

    def result_of(self, request_id: Any, timeout: float | None) -> dict[str, Any]:
        message = self.receive(request_id, timeout)
        self._pending.pop(request_id, None)
        return result_of(message)

    # -- operations ---------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def protocol(self) -> tuple[int, int]:
        """The daemon's protocol version, (major, minor): an operation or field whose
        ``since`` (rkllmd/schema.py) is above the minor is not there."""
        major, minor = self.ping()["protocol"]
        return major, minor

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        system: str | None = None,
        cache: str | None = None,
        no_cache: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repeat_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        tools: list[dict[str, Any]] | None = None,
        vars: dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
        raw: bool = False,
        format: str | dict[str, Any] | None = None,
        grammar: str | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        model: str | None = None,
        keep_alive: float | str | None = None,
        on_behalf_of: str | None = None,
    ) -> Stream:
        """Start a generation; iterate the returned Stream for text (or ``pieces()`` for
        reasoning as well), then read ``.result``. ``messages`` may hold the roles and keys
        of docs/protocol.md (tool results, assistant ``tool_calls``). ``raw``: ``prompt``
        is the whole prompt text, sent without the template (protocol 1.4). ``format``
        ("json" or a JSON Schema), ``grammar`` and a forced ``tool_choice`` constrain the
        answer; ``logprobs`` adds each token's log-probability to the pieces and the result
        (protocol 1.6). ``model`` names the model (None: the daemon's default) and
        ``keep_alive`` how long it stays loaded once idle (protocol 1.8). ``on_behalf_of``:
        the person a program serving several asks for; they take turns (protocol 1.11)."""
        started = time.monotonic()
        request_id = self.send(
            "generate",
            prompt=prompt,
            messages=messages,
            system=system,
            cache=cache,
            no_cache=no_cache or None,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            seed=seed,
            max_tokens=max_tokens,
            stop=stop or None,
            tools=tools,
            vars=vars,
            enable_thinking=enable_thinking,
            raw=raw or None,
            format=format,
            grammar=grammar,
            tool_choice=tool_choice,
            logprobs=logprobs or None,
            top_logprobs=top_logprobs,
            model=model,
            keep_alive=keep_alive,
            on_behalf_of=on_behalf_of,
        )
        return Stream(self, request_id, StreamReader(started))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        vars: dict[str, Any] | None = None,
        template: str | None = None,
        add_generation_prompt: bool = True,
        model: str | None = None,
    ) -> dict[str, Any]:
        """``{"text", "tokens"}``: the exact prompt ``messages`` render to. ``template``: a
        family's name or a template's Jinja text (None: the loaded model's)."""
        return self.call("render", messages=messages, tools=tools, vars=vars, template=template, add_generation_prompt=add_generation_prompt, model=model)

    def embed(
        self,
        input: str | list[str] | list[int] | list[list[int]],
        *,
        model: str | None = None,
        truncate: bool = True,
        normalize: bool = True,
        keep_alive: float | str | None = None,
    ) -> dict[str, Any]:
        """The ``embed`` result with ``embeddings`` as lists of floats (one per input, in
        order). It waits as long as the daemon computes (a long list takes a while on a
        board); a daemon that goes away fails it."""
        request_id = self.send("embed", input=input, model=model, truncate=truncate, normalize=normalize, keep_alive=keep_alive)
        return decoded_embeddings(self.result_of(request_id, None))

    def cancel(self, request_id: Any) -> dict[str, Any]:
        return self.call("cancel", target=request_id)

    def models(self) -> dict[str, Any]:
        """``{"models", "default", "loaded"}``: every model by name, and the loaded weights (protocol 1.8)."""
        return self.call("models")

    def create(self, name: str, base: str, *, system: str | None = None, parameters: dict[str, Any] | None = None,
               template: str | None = None) -> dict[str, Any]:
        """Derive ``name`` from ``base``: its weights, with this system message, parameters or template."""
        return self.call("create", name=name, **{"from": base}, system=system, parameters=parameters, template=template)

    def copy(self, source: str, destination: str) -> dict[str, Any]:
        return self.call("copy", source=source, destination=destination)

    def delete(self, name: str) -> dict[str, Any]:
        return self.call("delete", name=name)

    def load(self, model: str | None = None, keep_alive: float | str | None = None) -> dict[str, Any]:
        """Load ``model`` now (or with ``keep_alive`` 0 unload it once idle)."""
        return self.call("load", model=model, keep_alive=keep_alive)

    def pull(self, source: str, name: str | None = None, revision: str | None = None) -> PullStream:
        """Pull a model file from the Hugging Face hub (protocol 1.9): iterate the returned
        PullStream for its PullProgress, then read ``.result`` ({"finish_reason", "model",
        "digest", "size", "path"}); ``cancel()`` stops it (the next pull resumes)."""
        return PullStream(self, self.send("pull", source=source, name=name, revision=revision), PullReader())

    # Binary caches belong to a model (protocol 1.8): ``model`` None is the default model's.

    def cache_ls(self, model: str | None = None) -> dict[str, Any]:
        return self.call("cache.ls", model=model)

    def cache_show(self, name: str, model: str | None = None) -> dict[str, Any]:
        return self.call("cache.show", name=name, model=model)

    def cache_put(self, name: str, text: str, model: str | None = None) -> dict[str, Any]:
        return self.call("cache.put", name=name, text=text, model=model)

    def cache_rm(self, name: str) -> dict[str, Any]:
        return self.call("cache.rm", name=name)

    def cache_rebuild(self, name: str | None = None, model: str | None = None) -> dict[str, Any]:
        return self.call("cache.rebuild", name=name, model=model)

    def cache_wait(self, name: str, timeout: float = OPERATIONS["cache.wait"].field("timeout").default, model: str | None = None) -> dict[str, Any]:
        request_id = self.send("cache.wait", name=name, timeout=timeout, model=model)
        return self.result_of(request_id, timeout + self.timeout)


@dataclass
class Stream:
    """The messages of one generation: iterate for text deltas; ``result`` once it ended."""

    client: Client
    request_id: Any
    reader: StreamReader

    @property
    def result(self) -> GenerationResult | None:
        return self.reader.result

    @property
    def position(self) -> int | None:
        """Generations ahead of this one when it was queued."""
        return self.reader.position

    def __iter__(self) -> Iterator[str]:
        """The answer's text as it comes (reasoning left out)."""
        return (piece.text for piece in self.pieces() if piece.text)

    def pieces(self) -> Iterator[Piece]:
        """Each token message's answer and reasoning text as it comes."""
        return (event for event in self.events() if isinstance(event, Piece))

    def events(self) -> Iterator[Event]:
        """Everything the daemon says of this generation as it comes: Queued (again each
        time the position changes), Started, Progress (prefill, protocol 1.3), Piece."""
        return _read_stream(self.client, self.request_id, self.reader)

    def wait(self) -> GenerationResult:
        """Consume the rest of the stream and return its result."""
        for _ in self.events():
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> GenerationResult:
        """Cancel on the daemon (queued or running) and return the final result."""
        self.abandon()
        return self.wait()

    def abandon(self) -> None:
        """Cancel on the daemon and stop following: return once the daemon has taken the
        cancel in, without waiting for the generation's end (its next step, which a busy
        machine can make long), for a caller that is leaving (its messages still arrive)."""
        try:
            self.client.cancel(self.request_id)
        except DaemonError as exc:
            if exc.name != "not_found":  # it had finished already
                raise


@dataclass(frozen=True)
class PullProgress:
    """One of a pull's statuses, as Ollama words them; a download's with its bytes."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


@dataclass
class PullReader:
    """Follows one pull's messages: their order, its end (``result``)."""

    result: dict[str, Any] | None = None
    expected_seq: int = 0

    def feed(self, message: dict[str, Any]) -> PullProgress | None:
        if message["type"] == "error":
            raise_error(message)
        if message.get("seq") != self.expected_seq:
            raise ProtocolViolation(f"stream message {message.get('seq')} arrived when {self.expected_seq} was due")
        self.expected_seq += 1
        if message["type"] == "progress":
            return PullProgress(message["status"], message.get("digest"), message.get("total"), message.get("completed"))
        if message["type"] == "done":
            self.result = {key: message.get(key) for key in OPERATIONS["pull"].messages()["done"] if key != "seq"}
            return None
        raise ProtocolViolation(f"unexpected {message['type']!r} message in a pull's stream")


@dataclass
class PullStream:
    client: Client
    request_id: Any
    reader: PullReader

    @property
    def result(self) -> dict[str, Any] | None:
        return self.reader.result

    def __iter__(self) -> Iterator[PullProgress]:
        return _read_stream(self.client, self.request_id, self.reader)  # a download takes as long as it takes

    def wait(self) -> dict[str, Any]:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> dict[str, Any]:
        """Cancel on the daemon and return the end it reports (finish_reason "cancelled",
        or "success" when it had finished)."""
        try:
            self.client.cancel(self.request_id)
        except DaemonError as exc:
            if exc.name != "not_found":
                raise
        return self.wait()


# -- the protocol's framing, shared with the asyncio client (rkllmctl/aio.py) --------------


def decoded_embeddings(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with each embedding (a bin of little-endian float32) as a list of floats."""
    vectors = [list(struct.unpack(f"<{len(data) // 4}f", data)) for data in result["embeddings"]]
    return {**result, "embeddings": vectors}


def check_fields(op: str, fields: dict[str, Any]) -> None:
    """TypeError for a field the schema does not declare (a bug in the caller)."""
    unknown = {k for k, v in fields.items() if v is not None} - {f.name for f in OPERATIONS[op].fields}
    if unknown:
        raise TypeError(f"{op} has no field {', '.join(sorted(unknown))} (see rkllmd/schema.py)")


def encode_request(op: str, request_id: Any, fields: dict[str, Any]) -> bytes:
    """One request, its fields checked against the schema (None: left out)."""
    check_fields(op, fields)
    message = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    message.update({k: v for k, v in fields.items() if v is not None})
    return pack(message)


def decode_reply(data: bytes) -> dict[str, Any]:
    """One message from the daemon, or ProtocolViolation when the protocol does not allow it."""
    try:
        message = unpack(data)
    except WireError:
        raise ProtocolViolation(f"the daemon sent something that is not a msgpack message: {data[:64]!r}") from None
    if not isinstance(message, dict):
        raise ProtocolViolation(f"the daemon sent a {type(message).__name__}, not a map: {message!r:.200}")
    if message.get("type") not in REPLY_TYPES:
        raise ProtocolViolation(f"the daemon sent a message of unknown type {message.get('type')!r}")
    return message


def result_of(message: dict[str, Any]) -> dict[str, Any]:
    """The result map of a one-shot request's reply, or DaemonError."""
    if message["type"] == "error":
        raise_error(message)
    if message["type"] != "result":
        raise ProtocolViolation(f"expected a result, got {message['type']!r}")
    if not isinstance(message.get("result"), dict):
        raise ProtocolViolation(f"the daemon sent a result that is not a map: {message.get('result')!r:.200}")
    return message["result"]


@dataclass(frozen=True)
class Piece:
    """One token message: answer text and, for models that reason, reasoning text (protocol
    1.2); the log-probabilities of the tokens generated since the last piece, when asked
    for (protocol 1.4; the text they make may come in a later piece, held back as a
    possible stop string or tool call)."""

    text: str
    reasoning: str = ""
    logprobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Queued:
    """The generation waits with ``position`` generations ahead of it."""

    position: int


@dataclass(frozen=True)
class Started:
    """The generation left the queue after ``queue_ms``."""

    queue_ms: float | None


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` prompt tokens prefilled (``phase`` "prefill"; protocol 1.3)."""

    phase: str
    done: int
    total: int

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 100


#: What Stream.events() yields.
Event = Queued | Started | Progress | Piece


@dataclass
class StreamReader:
    """Follows one generation's messages: their order, its text, its end (GenerationResult)."""

    started: float
    result: GenerationResult | None = None
    position: int | None = None  # when first queued
    expected_seq: int = 0
    _parts: list[str] = field(default_factory=list)
    _logprobs: list[dict[str, Any]] = field(default_factory=list)
    _first_text_at: float | None = None
    _count: int = 0

    def feed(self, message: dict[str, Any]) -> Event | None:
        """Take the next message; its event (None for ``done``: read ``result``);
        DaemonError for an error."""
        kind = message["type"]
        if kind == "error":
            raise_error(message)
        seq = message.get("seq")
        if seq != self.expected_seq:
            raise ProtocolViolation(f"stream message {seq} arrived when {self.expected_seq} was due")
        self.expected_seq += 1
        self._count += 1
        if kind == "queued":  # sent again as the position changes (protocol 1.3)
            if self.position is None:
                self.position = message.get("position")
            return Queued(message.get("position"))
        if kind == "started":
            return Started(message.get("queue_ms"))
        if kind == "progress":
            return Progress(message.get("phase"), message.get("done"), message.get("total"))
        if kind == "token":
            if self._first_text_at is None:
                self._first_text_at = time.monotonic()
            self._parts.append(message["text"])
            logprobs = message.get("logprobs") or ()
            self._logprobs.extend(logprobs)
            return Piece(message["text"], message.get("reasoning", ""), tuple(logprobs))
        if kind == "done":
            ttft = None if self._first_text_at is None else (self._first_text_at - self.started) * 1000
            self.result = GenerationResult(
                text="".join(self._parts),
                finish_reason=message["finish_reason"],
                stats=message.get("stats"),
                cache=message.get("cache"),
                reason=message.get("reason"),
                client_ttft_ms=ttft,
                messages=self._count,
                reasoning=message.get("reasoning"),
                tool_calls=message.get("tool_calls"),
                tool_call_error=message.get("tool_call_error"),
                logprobs=self._logprobs,
            )
            return None
        raise ProtocolViolation(f"unexpected {kind!r} message in a generation stream")


def raise_error(message: dict[str, Any]) -> None:
    error = message.get("error") or {}
    raise DaemonError(error.get("code", 0), error.get("name", "unknown"), error.get("message", "unknown error"), error.get("details"))


def _read_stream(client: Client, request_id: int, reader: Any) -> Iterator[Any]:
    """A stream's events as its messages come, until ``reader`` has its result; only the
    first message (queued, progress or an error) is bounded by the client's timeout."""
    while reader.result is None:
        message = client.receive(request_id, client.timeout if reader.expected_seq == 0 else None)
        if message["type"] in ("error", "done"):
            client._pending.pop(request_id, None)
        event = reader.feed(message)
        if event is not None:
            yield event
