"""generate: queue a completion; its messages stream back (queued, started, token..., done)."""

from __future__ import annotations

import time
from typing import Any

from ..backends.base import SamplingParams
from ..caches.names import check_name
from ..caches.text import TextCacheError
from ..outbox import Generation
from ..protocol import ErrorCode, WireError
from ..templates import ROLES
from .validate import get

OP = "generate"
MAX_MESSAGES = 1024
MAX_STOPS = 16
MAX_STOP_CHARS = 256


def execute(daemon: Any, identity: bytes, request: dict[str, Any]) -> None:
    config = daemon.config
    request_id = request["id"]
    if (identity, request_id) in daemon.generations:
        raise WireError(ErrorCode.DUPLICATE_ID, f"request {request_id!r} of this client is still running")
    messages = _messages(request, config["daemon.max_prompt_chars"])
    cache = get(request, "cache", str, None)
    if cache is not None:
        messages = _with_cache_text(daemon, check_name(cache), messages)
    params = SamplingParams(
        temperature=get(request, "temperature", float, config["sampling.temperature"], low=0.0, high=10.0),
        top_k=get(request, "top_k", int, config["sampling.top_k"], low=0, high=100_000),
        top_p=get(request, "top_p", float, config["sampling.top_p"], low=0.0, high=1.0),
        repeat_penalty=get(request, "repeat_penalty", float, config["sampling.repeat_penalty"], low=0.0, high=10.0),
        seed=get(request, "seed", int, None, low=0, high=2**64 - 1),
        max_tokens=get(request, "max_tokens", int, config["sampling.max_tokens"], low=1, high=config["daemon.max_tokens_limit"]),
        stop=_stops(request),
    )
    gen = Generation(
        identity=identity,
        request_id=request_id,
        prompt=daemon.backend.render(messages),
        params=params,
        cache=cache,
        use_cache=not get(request, "no_cache", bool, False),
        received=time.monotonic(),
    )
    daemon.worker.submit(gen)
    daemon.generations[gen.key] = gen
    return None


def _messages(request: dict[str, Any], max_chars: int) -> list[dict[str, str]]:
    """Either ``messages`` (a chat) or ``prompt`` with an optional ``system``."""
    if "messages" in request and "prompt" in request:
        raise WireError(ErrorCode.INVALID_FIELD, "give either 'messages' or 'prompt', not both", field="messages")
    if "messages" in request:
        raw = get(request, "messages", list)
        if not raw or len(raw) > MAX_MESSAGES:
            raise WireError(ErrorCode.INVALID_FIELD, f"'messages' must hold 1 to {MAX_MESSAGES} messages", field="messages")
        messages = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise WireError(ErrorCode.INVALID_FIELD, f"messages[{i}] must be a map", field="messages")
            role, content = item.get("role"), item.get("content")
            if role not in ROLES:
                raise WireError(ErrorCode.INVALID_FIELD, f"messages[{i}].role must be one of {', '.join(ROLES)}", field="messages")
            if not isinstance(content, str):
                raise WireError(ErrorCode.INVALID_FIELD, f"messages[{i}].content must be a string", field="messages")
            messages.append({"role": role, "content": content})
    else:
        messages = []
        system = get(request, "system", str, None)
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": get(request, "prompt", str)})
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise WireError(ErrorCode.TOO_LARGE, f"the prompt is {total} characters; the limit is {max_chars}", field="messages")
    if any("\x00" in m["content"] for m in messages):
        raise WireError(ErrorCode.INVALID_FIELD, "message content must not contain NUL", field="messages")
    return messages


def _with_cache_text(daemon: Any, name: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``cache: NAME`` makes the text cache the conversation's system message."""
    if messages[0]["role"] == "system":
        raise WireError(ErrorCode.INVALID_FIELD, "a request with 'cache' must not carry its own system message", field="cache")
    try:
        text = daemon.caches.texts.read(name)
    except TextCacheError as exc:
        raise WireError(ErrorCode.CACHE_BUILD_FAILED, f"text cache {name} cannot be used: {exc}") from None
    if text is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return [{"role": "system", "content": text.text}, *messages]


def _stops(request: dict[str, Any]) -> tuple[str, ...]:
    stops = get(request, "stop", list, [])
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise WireError(ErrorCode.INVALID_FIELD, f"'stop' must be up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters", field="stop")
    return tuple(stops)
