"""generate: queue a completion; its messages stream back (queued, started, token..., done)."""

from __future__ import annotations

import time

from ..backends.base import SamplingParams
from ..caches.text import TextCacheError, system_text
from ..outbox import Generation
from ..protocol import ErrorCode, WireError
from .context import Context, Request

OP = "generate"


def execute(ctx: Context, request: Request) -> None:
    args = request.args
    if (request.identity, request.id) in ctx.generations:
        raise WireError(ErrorCode.DUPLICATE_ID, f"request {request.id!r} of this client is still running")
    messages = _messages(args, ctx.config.daemon.max_prompt_chars)
    if args["cache"] is not None:
        messages = _with_cache_text(ctx, args["cache"], messages)
    params = SamplingParams(
        temperature=args["temperature"],
        top_k=args["top_k"],
        top_p=args["top_p"],
        repeat_penalty=args["repeat_penalty"],
        seed=args["seed"],
        max_tokens=args["max_tokens"],
        stop=args["stop"],
    )
    gen = Generation(
        identity=request.identity,
        request_id=request.id,
        prompt=ctx.worker.backend.render(messages),
        params=params,
        cache=args["cache"],
        use_cache=not args["no_cache"],
        received=time.monotonic(),
    )
    ctx.worker.submit(gen)
    ctx.generations[gen.key] = gen
    return None


def _messages(args: dict, max_chars: int) -> list[dict[str, str]]:
    """Either ``messages`` (a chat) or ``prompt`` with an optional ``system``."""
    messages = args["messages"]
    if messages is None:
        messages = [] if args["system"] is None else [{"role": "system", "content": args["system"]}]
        messages.append({"role": "user", "content": args["prompt"]})
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise WireError(ErrorCode.TOO_LARGE, f"the prompt is {total} characters; the limit is {max_chars}", field="messages")
    if any("\x00" in m["content"] for m in messages):
        raise WireError(ErrorCode.INVALID_FIELD, "message content must not contain NUL", field="messages")
    return [{**m, "content": system_text(m["content"])} if m["role"] == "system" else m for m in messages]


def _with_cache_text(ctx: Context, name: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``cache: NAME`` makes the text cache the conversation's system message.

    The one file read on the socket loop: a text cache is at most ``cache.max_text_bytes``
    and is read without following links or opening anything but a regular file.
    """
    if messages[0]["role"] == "system":
        raise WireError(ErrorCode.INVALID_FIELD, "a request with 'cache' must not carry its own system message", field="cache")
    try:
        text = ctx.caches.texts.read(name)
    except TextCacheError as exc:
        raise WireError(ErrorCode.CACHE_BUILD_FAILED, f"text cache {name} cannot be used: {exc}") from None
    if text is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return [{"role": "system", "content": system_text(text.text)}, *messages]
