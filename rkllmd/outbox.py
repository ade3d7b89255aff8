"""Messages on their way from the model worker to the socket loop.

Only the socket loop touches the ZeroMQ socket. The worker appends to a request's
stream here and wakes the loop through a pipe. Text produced while earlier text is
still waiting (a busy loop, a slow client) joins the waiting token message, so a slow
reader costs one growing message instead of one ZeroMQ message per token.

Token text is also paced: a stream's first piece wakes the loop at once, later pieces
at most every ``TOKEN_WAKE_INTERVAL_S`` (text in between joins the waiting message and
goes with the next wake, or with the final message). Each wake costs the model a GIL
hand-over and the cores a burst of the loop's and the client's work while the matrix
products run: at 45 tokens/s, one wake per token cost decode 2.7 %; pacing at 25 Hz
halves the wakes and delays a piece by at most 40 ms, below what a reader sees.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .sampling import SamplingParams
from .protocol import reply
from .templates.output import OutputSplitter

#: The output fields of a ``done`` whose generation never produced any (cancelled before it ran).
NO_OUTPUT = {"reasoning": None, "tool_calls": None, "tool_call_error": None}

#: Messages that only report a state: one not sent yet is replaced by the next.
_SUPERSEDED = ("queued", "progress")
#: What may make room in a runner (and a ``queued`` with ``cache_build``): the scheduler hears of it (``Outbox.on_event``).
_SCHEDULING_EVENTS = ("started", "done", "error")

#: A stream's token text wakes the socket loop at most this often (its first piece at once).
TOKEN_WAKE_INTERVAL_S = 0.04


@dataclass(frozen=True)
class Chat:
    """What a generation's prompt is rendered from: by the model worker, with the template of
    the model that will run it (a reload may change the model while the request waits).
    A ``raw`` prompt is the whole prompt text, sent as it is (no template, no messages)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    variables: dict[str, Any] | None = None
    raw: str | None = None
    # What the answer is constrained to (protocol 1.4), made a Constraint with the template:
    # checked when the request arrives, shaped by the template of the model that runs it.
    format: str | dict[str, Any] | None = None
    grammar: str | None = None
    tool_choice: str | dict[str, Any] | None = None
    #: The model's own template when it overrides its weights' (a family name or Jinja text).
    template: str = ""


@dataclass(eq=False)
class Generation:
    """One generate request, from arrival to its final message."""

    identity: bytes
    request_id: Any
    params: SamplingParams
    cache: str | None
    use_cache: bool
    received: float
    chat: Chat | None = None
    client: str = ""  # who asked, for status (Connections.client_name, and for whom)
    on_behalf_of: str = ""  # whom a gateway asked for: clients take turns per connection and this
    # Written by the model worker's preparation, under its lock: the prompt as the backend
    # ``prepared_for`` runs it (rendered, tokenized), and how its output is split.
    prompt: str = ""
    prompt_ids: Sequence[int] | None = None
    output: OutputSplitter | None = None  # the raw output -> reasoning, answer, tool calls (worker thread only)
    prepared_for: object | None = None
    prefix_cache: str | None = None  # the text cache its prompt starts with (the longest), as prepared
    waits_for_build: str | None = None  # the text cache whose build it waits for (it holds no place in the batch meanwhile)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    # Stream state, guarded by the Outbox lock; ``seq`` is given as each message is sent.
    messages: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0
    finished: bool = False
    gone: bool = False
    token_woke_at: float | None = None  # when its token text last woke the socket loop
    # Written by the model worker (under its lock): what status shows of it.
    position: int | None = None  # generations ahead of it, as last sent in ``queued``
    started: float | None = None  # when the worker took it (time.monotonic())
    worker: Any = None  # the ModelWorker (or runner) it was given to (None while it waits in the scheduler)
    ended: bool = False  # its final message was made (sent, or dropped with a client gone)

    @property
    def key(self) -> tuple[bytes, Any]:
        return (self.identity, self.request_id)

    @property
    def turn(self) -> tuple[bytes, str]:
        """Whose turn it is: its connection's, and the person a gateway asked for."""
        return (self.identity, self.on_behalf_of)


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plain: deque[tuple[bytes, dict[str, Any]]] = deque()
        self._streams: dict[int, Generation] = {}  # insertion-ordered set
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signalled = False
        #: Called when a stream starts or ends (from any thread, maybe under a worker's lock: it must take none): the scheduler's wake-up.
        self.on_event: Callable[[], None] = lambda: None

    def fileno(self) -> int:
        return self._wake_r

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        # Called with the lock held; one byte in the pipe is enough to wake the loop.
        if not self._signalled:
            self._signalled = True
            os.write(self._wake_w, b"\0")

    def post(self, identity: bytes, message: dict[str, Any]) -> None:
        """A standalone reply (not part of a generation stream)."""
        with self._lock:
            self._plain.append((identity, message))
            self._wake()

    def wake(self) -> None:
        """Wake the socket loop (any thread): what its status line shows may have changed."""
        with self._lock:
            self._wake()

    def stream(self, gen: Generation, type_: str, **fields: Any) -> None:
        """Queue a message of ``gen``'s stream; "token" text joins a waiting token message."""
        self._queue(gen, type_, fields, paced=False)

    def forward(self, gen: Generation, type_: str, fields: dict[str, Any]) -> None:
        """``stream`` for a message from a runner, whose token text comes paced already
        (``runner.child.ForwardingOutbox``): it wakes the loop at once. Paced twice, a
        frame that came a little under an interval after the loop's last wake waited for
        the next one: pieces reached the client up to 86 ms apart."""
        self._queue(gen, type_, fields, paced=True)

    def _queue(self, gen: Generation, type_: str, fields: dict[str, Any], paced: bool) -> None:
        if type_ in _SCHEDULING_EVENTS or "cache_build" in fields:
            if type_ in ("done", "error"):
                gen.ended = True
            self.on_event()
        with self._lock:
            if gen.finished or gen.gone:
                return
            last = gen.messages[-1] if gen.messages else None
            if type_ == "token" and last is not None and last["type"] == "token":
                join_token(last, fields)
            elif type_ in _SUPERSEDED and last is not None and last["type"] == type_ and last.get("status") == fields.get("status"):
                last.update(fields)  # a newer position or progress replaces one not sent yet (a pull's next status does not)
            else:
                gen.messages.append(reply(gen.request_id, type_, **fields))
            gen.finished = type_ in ("done", "error")
            self._streams[id(gen)] = gen
            if type_ == "token" and not paced and not token_wake_due(gen):
                return  # goes with the next wake: a later piece's, or the final message's
            self._wake()

    def take(self) -> tuple[list[tuple[bytes, dict[str, Any]]], list[tuple[Generation, list[dict[str, Any]]]]]:
        """Everything waiting: standalone replies, and each stream's messages in order."""
        with self._lock:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._signalled = False
            plain = list(self._plain)
            self._plain.clear()
            streams = [(gen, gen.messages) for gen in self._streams.values()]
            for gen in self._streams.values():
                gen.messages = []
            self._streams.clear()
        return plain, streams

    def give_back(self, gen: Generation, unsent: list[dict[str, Any]]) -> None:
        """Messages a slow client could not take yet go back in front, merged with newer text."""
        with self._lock:
            newer = gen.messages
            if newer and unsent and newer[0]["type"] == "token" and unsent[-1]["type"] == "token":
                join_token(unsent[-1], newer.pop(0))
            gen.messages = unsent + newer
            self._streams[id(gen)] = gen

    def drop(self, gen: Generation) -> None:
        """Forget a stream whose client is gone."""
        with self._lock:
            gen.gone = True
            gen.messages = []
            self._streams.pop(id(gen), None)


def token_wake_due(gen: Generation) -> bool:
    """Whether ``gen``'s token text wakes its reader now: its first piece, or the last wake
    is ``TOKEN_WAKE_INTERVAL_S`` old (then this is the new last wake)."""
    now = time.monotonic()
    if gen.token_woke_at is not None and now - gen.token_woke_at < TOKEN_WAKE_INTERVAL_S:
        return False
    gen.token_woke_at = now
    return True


def join_token(token: dict[str, Any], later: dict[str, Any]) -> None:
    """A later token message's text into a waiting one. Reasoning comes before any answer
    text in a model's output, so a joined message's ``reasoning`` still precedes its ``text``;
    the tokens' ``logprobs`` keep their order."""
    token["text"] += later["text"]
    if later.get("reasoning"):
        token["reasoning"] = token.get("reasoning", "") + later["reasoning"]
    if later.get("logprobs"):
        token["logprobs"] = token.get("logprobs", []) + later["logprobs"]
