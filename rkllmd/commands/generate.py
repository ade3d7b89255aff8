"""generate: queue a completion; its messages stream back (queued, started, token..., done)."""

from __future__ import annotations

import time

from ..backends.base import SamplingParams
from ..caches.text import system_text
from ..constraints import ConstraintError, from_request
from ..outbox import Generation
from ..protocol import ErrorCode, WireError
from ..templates.output import OutputSplitter
from .context import Context, Request
from .render import checked

OP = "generate"


def execute(ctx: Context, request: Request) -> None:
    args = request.args
    if (request.identity, request.id) in ctx.generations:
        raise WireError(ErrorCode.DUPLICATE_ID, f"request {request.id!r} of this client is still running")
    messages = _messages(args, ctx.config.daemon.max_prompt_chars)
    if args["cache"] is not None:
        messages = _with_cache_text(ctx, args["cache"], messages)
    backend = ctx.worker.backend
    tools = args["tools"] if args["tool_choice"] != "none" else None
    prompt = backend.render(messages, tools=tools, variables=_variables(args))
    template = backend.template
    try:
        constraint = from_request(
            format=args["format"],
            grammar=args["grammar"],
            tools=tools,
            tool_choice=args["tool_choice"],
            reasoning=template.reasoning,
            reasoning_opened=OutputSplitter.reasoning_opened(template, prompt),
            tool_format=template.tool_calls,
        )
    except ConstraintError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field) from None
    params = SamplingParams(
        temperature=args["temperature"],
        top_k=args["top_k"],
        top_p=args["top_p"],
        repeat_penalty=args["repeat_penalty"],
        seed=args["seed"],
        max_tokens=args["max_tokens"],
        stop=args["stop"],
        constraint=constraint,
        logprobs=args["top_logprobs"] if args["logprobs"] else None,
    )
    gen = Generation(
        identity=request.identity,
        request_id=request.id,
        prompt=prompt,
        output=OutputSplitter.for_prompt(template, prompt, tools=bool(tools), tool_format=constraint.tool_format if constraint else None),
        params=params,
        cache=args["cache"],
        use_cache=not args["no_cache"],
        received=time.monotonic(),
        client=request.client,
    )
    ctx.worker.submit(gen)
    ctx.generations[gen.key] = gen
    return None


def _variables(args: dict) -> dict | None:
    """``vars``, with ``enable_thinking`` as the shorthand it is."""
    variables, thinking = args["vars"], args["enable_thinking"]
    if thinking is None:
        return variables
    if variables is not None and variables.get("enable_thinking", thinking) != thinking:
        raise WireError(ErrorCode.INVALID_FIELD, "'enable_thinking' and 'vars.enable_thinking' disagree", field="enable_thinking")
    return {**(variables or {}), "enable_thinking": thinking}


def _messages(args: dict, max_chars: int) -> list[dict]:
    """Either ``messages`` (a chat) or ``prompt`` with an optional ``system``."""
    messages = args["messages"]
    if messages is None:
        messages = [] if args["system"] is None else [{"role": "system", "content": args["system"]}]
        messages.append({"role": "user", "content": args["prompt"]})
    return checked(messages, max_chars)


def _with_cache_text(ctx: Context, name: str, messages: list[dict]) -> list[dict]:
    """``cache: NAME`` makes the text cache the conversation's system message: its text as
    the cache index last read it (the file watcher and ``cache.put`` keep it current),
    so the socket loop reads no file."""
    if messages[0]["role"] == "system":
        raise WireError(ErrorCode.INVALID_FIELD, "a request with 'cache' must not carry its own system message", field="cache")
    text, refused = ctx.caches.text_of(name)
    if refused is not None:
        raise WireError(ErrorCode.CACHE_BUILD_FAILED, f"text cache {name} cannot be used: {refused}")
    if text is None:
        raise WireError(ErrorCode.NOT_FOUND, f"no text cache named {name}")
    return [{"role": "system", "content": system_text(text)}, *messages]
