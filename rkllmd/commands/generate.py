"""generate: queue a completion; its messages stream back (queued, started, token..., done).

The chat is checked here; the worker of the model that runs it renders it, with that
model's template (rkllmd/worker.py). A template that refuses the chat ends the stream
with ``invalid_field``.
"""

from __future__ import annotations

import time

from ..sampling import SamplingParams
from ..caches.text import system_text
from ..constraints import ConstraintError, from_request
from ..models import keep_alive
from ..outbox import Chat, Generation
from ..protocol import ErrorCode, WireError
from ..schema import MAX_ON_BEHALF_CHARS
from ..templates.capabilities import CapabilityMissing, require_capabilities, require_completion
from .context import Context, Request
from ..worker import chat_template
from .render import checked

OP = "generate"


def execute(ctx: Context, request: Request) -> None:
    args, model = request.args, request.model
    assert model is not None  # the socket loop resolved it (or answered not_found)
    if (request.identity, request.id) in ctx.generations:
        raise WireError(ErrorCode.DUPLICATE_ID, f"request {request.id!r} of this client is still running")
    keep = keep_alive_of(args)
    if args["on_behalf_of"] is not None and not 0 < len(args["on_behalf_of"]) <= MAX_ON_BEHALF_CHARS:
        raise WireError(ErrorCode.INVALID_FIELD, f"field 'on_behalf_of' must be 1 to {MAX_ON_BEHALF_CHARS} characters", field="on_behalf_of")
    shape = {"format": args["format"], "grammar": args["grammar"], "tool_choice": args["tool_choice"]}
    loaded = ctx.pool.get(model.weights.name)  # None: loading or to load; the worker checks what follows then
    if loaded is not None:
        try:  # at once, as Ollama answers; the worker checks again for the model that runs it
            require_completion(loaded.backend)
        except CapabilityMissing as exc:
            raise WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field, capability=exc.capability) from None
    if args["raw"]:
        chat = Chat(raw=_raw_prompt(args, ctx.config.daemon.max_prompt_chars), **shape)
    else:
        messages = _messages(args, ctx.config.daemon.max_prompt_chars)
        if args["cache"] is not None:
            messages = _with_cache_text(ctx, args["cache"], messages)
        elif model.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_text(model.system)}, *messages]  # the model's own
        tools = args["tools"] if args["tool_choice"] != "none" else None  # "none": the tools are not offered
        chat = Chat(messages, tools=tools, variables=_variables(args), template=model.template, **shape)
        if loaded is not None:
            try:  # at once, as Ollama answers; the worker checks again for the model that runs it
                require_capabilities(loaded.backend, chat, chat_template(loaded.backend, chat))
            except CapabilityMissing as exc:
                raise WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field, capability=exc.capability) from None
    if loaded is not None:
        try:  # at once too; the worker makes the constraint with the template of the model that runs it
            tool_format = None if chat.raw is not None else chat_template(loaded.backend, chat).tool_calls
            from_request(**shape, tools=chat.tools, tool_format=tool_format)
        except ConstraintError as exc:
            raise WireError(ErrorCode.INVALID_FIELD, str(exc), field=exc.field) from None
    params = SamplingParams(
        temperature=args["temperature"],
        top_k=args["top_k"],
        top_p=args["top_p"],
        repeat_penalty=args["repeat_penalty"],
        frequency_penalty=args["frequency_penalty"],
        presence_penalty=args["presence_penalty"],
        seed=args["seed"] if args["seed"] is not None else model.parameters.get("seed"),
        max_tokens=args["max_tokens"],
        stop=args["stop"],
        logprobs=args["top_logprobs"] if args["logprobs"] else None,
    )
    gen = Generation(
        identity=request.identity,
        request_id=request.id,
        chat=chat,
        params=params,
        cache=args["cache"],
        use_cache=not args["no_cache"],
        received=time.monotonic(),
        client=request.client if not args["on_behalf_of"] else f"{request.client} for {args['on_behalf_of']}",
        on_behalf_of=args["on_behalf_of"] or "",
    )
    ctx.scheduler.submit(gen, model.weights, keep)
    ctx.generations[gen.key] = gen
    return None


def keep_alive_of(args: dict) -> float | None | str:
    """The request's ``keep_alive`` in seconds (None: forever), or "default" when it gives none."""
    if args["keep_alive"] is None:
        return "default"
    try:
        return keep_alive.seconds(args["keep_alive"])
    except keep_alive.KeepAliveError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, str(exc), field="keep_alive") from None


def _variables(args: dict) -> dict | None:
    """``vars``, with ``enable_thinking`` as the shorthand it is."""
    variables, thinking = args["vars"], args["enable_thinking"]
    if thinking is None:
        return variables
    if variables is not None and variables.get("enable_thinking", thinking) != thinking:
        raise WireError(ErrorCode.INVALID_FIELD, "'enable_thinking' and 'vars.enable_thinking' disagree", field="enable_thinking")
    return {**(variables or {}), "enable_thinking": thinking}


#: What a raw prompt cannot come with: each would need the template it skips.
_NOT_RAW = ("system", "messages", "cache", "tools", "vars", "enable_thinking")


def _raw_prompt(args: dict, max_chars: int) -> str:
    """``prompt`` as the whole prompt text (OpenAI's completions, Ollama's ``raw``)."""
    for name in _NOT_RAW:
        if args[name] is not None:
            raise WireError(ErrorCode.INVALID_FIELD, f"{name!r} cannot go with 'raw': a raw prompt is sent as it is, without the template", field=name)
    if not args["prompt"]:
        raise WireError(ErrorCode.INVALID_FIELD, "'raw' needs a non-empty 'prompt'", field="prompt")
    return checked([{"role": "user", "content": args["prompt"]}], max_chars)[0]["content"]


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
