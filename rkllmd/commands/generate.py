"""generate: queue a completion; its messages stream back (queued, started, token..., done)."""

from __future__ import annotations

import time

from ..backends.base import Backend, SamplingParams
from ..caches.text import system_text
from ..outbox import Generation
from ..protocol import ErrorCode, WireError
from ..templates.capabilities import THINKING, TOOLS
from ..templates.output import OutputSplitter
from .context import Context, Request
from .render import checked

OP = "generate"


def execute(ctx: Context, request: Request) -> None:
    args = request.args
    if (request.identity, request.id) in ctx.generations:
        raise WireError(ErrorCode.DUPLICATE_ID, f"request {request.id!r} of this client is still running")
    backend = ctx.worker.backend
    if args["raw"]:
        prompt = _raw_prompt(args, ctx.config.daemon.max_prompt_chars)
        output = OutputSplitter(None)  # the text as the model wrote it: no template said where reasoning or calls are
    else:
        messages = _messages(args, ctx.config.daemon.max_prompt_chars)
        if args["cache"] is not None:
            messages = _with_cache_text(ctx, args["cache"], messages)
        _require_capabilities(args, backend)
        prompt = backend.render(messages, tools=args["tools"], variables=_variables(args))
        output = OutputSplitter.for_prompt(backend.template, prompt, tools=bool(args["tools"]))
    params = SamplingParams(
        temperature=args["temperature"],
        top_k=args["top_k"],
        top_p=args["top_p"],
        repeat_penalty=args["repeat_penalty"],
        frequency_penalty=args["frequency_penalty"],
        presence_penalty=args["presence_penalty"],
        seed=args["seed"],
        max_tokens=args["max_tokens"],
        stop=args["stop"],
    )
    gen = Generation(
        identity=request.identity,
        request_id=request.id,
        prompt=prompt,
        output=output,
        params=params,
        cache=args["cache"],
        use_cache=not args["no_cache"],
        received=time.monotonic(),
        client=request.client,
    )
    ctx.worker.submit(gen)
    ctx.generations[gen.key] = gen
    return None


#: What a model lacking a capability is told, after "NAME does not support tools/thinking".
_WHY_NOT = {
    TOOLS: "its chat template ({}) does not write tools into the prompt in a form whose calls rkllmd parses back",
    THINKING: "its chat template ({}) neither reads enable_thinking nor opens a reasoning block rkllmd splits off",
}


def _require_capabilities(args: dict, backend: Backend) -> None:
    """Refuse tools or thinking the model's template cannot do, as Ollama does ("... does
    not support tools"), rather than drop them silently; ``enable_thinking`` false is fine."""
    for capability, field, asked in ((THINKING, "enable_thinking", args["enable_thinking"] is True), (TOOLS, "tools", bool(args["tools"]))):
        if asked and capability not in backend.template.capabilities:  # thinking first, as Ollama checks
            name = backend.describe().get("name", "the model")
            raise WireError(ErrorCode.INVALID_FIELD, f"{name} does not support {capability}: " + _WHY_NOT[capability].format(backend.template.name),
                            field=field, capability=capability)


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
