"""OpenAI's API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions
(plain and server-sent events) and POST /v1/embeddings.

Request fields map onto ``generate`` (docs/http.md has the table); those the daemon
cannot honour are refused with OpenAI's error shape rather than silently ignored.
/v1/completions sends its prompt raw (protocol 1.4): the text as it is, no chat template.
Structured output (``response_format``, a forced ``tool_choice``) and logprobs map onto the
daemon's constrained decoding (protocol 1.6). Embeddings are the daemon's ``embed``
(protocol 1.7): mean-pooled and L2-normalised, as OpenAI's are unit vectors.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Any, Awaitable, Callable

from aiohttp import web

from .errors import ApiError, api_error, invalid
from .gateway import Gateway
from .generation import Generation, number, on_behalf_of, require, stops, text_content

#: Daemon finish reasons OpenAI has; others (cancelled, error) are told as an error.
FINISH_REASONS = {"stop": "stop", "length": "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def models(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    return web.json_response({"object": "list", "data": [model_object(info) for info in await gateway.models()]})


async def model(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    return web.json_response(model_object(await gateway.model(request.match_info["model"])))


def model_object(info: Any) -> dict[str, Any]:
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": "rkllmd"}


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields both completion endpoints share, or ApiError (400)."""
    if body.get("n") not in (None, 1):
        raise invalid("n > 1 is not supported: the daemon generates one choice per request", "n", "unsupported_value")
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    max_tokens = number(body, "max_completion_tokens", int)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise invalid("'model' must be a string", "model")
    return {
        "model": body.get("model") or None,  # the daemon answers not_found for one it does not have
        "temperature": number(body, "temperature", float),
        "top_p": number(body, "top_p", float),
        "top_k": number(body, "top_k", int),
        "repeat_penalty": number(body, "repetition_penalty", float),
        "frequency_penalty": number(body, "frequency_penalty", float),
        "presence_penalty": number(body, "presence_penalty", float),
        "seed": number(body, "seed", int),
        "max_tokens": max_tokens if max_tokens is not None else number(body, "max_tokens", int),
        "stop": stops(body.get("stop"), "stop"),
    }


def generate_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The ``generate`` request for a chat completion request, or ApiError (400)."""
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise invalid("'messages' must be a non-empty array", "messages")
    fields: dict[str, Any] = {
        "messages": [message(m, i) for i, m in enumerate(body["messages"])],
        **sampling_fields(body),
        "cache": body.get("rkllm_cache"),
        **response_format(body.get("response_format")),
        **chat_logprobs(body),
    }
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools and choice != "none":
        require("tools", "'tools'")
        fields["tools"] = tools
        if choice not in (None, "auto"):
            require("tool_choice", "a forced 'tool_choice'")
            fields["tool_choice"] = choice  # "required", or {"type": "function", "function": {"name"}}
    elif choice not in (None, "auto", "none"):
        raise invalid("a forced 'tool_choice' needs 'tools'", "tool_choice")
    effort = body.get("reasoning_effort")
    if effort is not None:
        require("enable_thinking", "'reasoning_effort'")
        fields["enable_thinking"] = effort != "none"
    return fields


def response_format(value: Any) -> dict[str, Any]:
    """``format`` for OpenAI's ``response_format``: json_object is any JSON object, json_schema
    its ``schema`` (enforced whether ``strict`` or not: the daemon constrains the sampler)."""
    if value is None or value == {"type": "text"}:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        require("format", "'response_format'")
        return {"format": "json"}
    if kind == "json_schema":
        require("format", "'response_format'")
        spec = value.get("json_schema")
        schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("'response_format.json_schema.schema' must be a JSON Schema (an object)", "response_format")
        return {"format": schema}
    raise invalid("'response_format.type' must be text, json_object or json_schema", "response_format")


def chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """Chat's ``logprobs`` (true) and ``top_logprobs`` (0–20, only with it)."""
    top = number(body, "top_logprobs", int)
    if not body.get("logprobs"):
        if top:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return {}
    require("logprobs", "'logprobs'")
    return {"logprobs": True, "top_logprobs": top}


#: Daemon fields whose errors name another parameter of OpenAI's request.
PARAMS = {"format": "response_format", "repeat_penalty": "repetition_penalty", "cache": "rkllm_cache"}


def choice_logprobs(entries: Any) -> dict[str, Any] | None:
    """A chat choice's ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    return {"content": list(entries), "refusal": None} if entries else None


def message(m: Any, i: int) -> dict[str, Any]:
    """The message as the client gave it, every key (the template may read any: Phi-4-mini's
    ``tools`` on a system message, a ``name``), with the daemon's role and text content."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise invalid(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
    out: dict[str, Any] = {**m, "role": ROLES[m["role"]]}
    if m.get("content") is not None or not m.get("tool_calls"):
        out["content"] = text_content(m.get("content"), f"{where}.content")
    for key in ("tool_calls", "tool_call_id", "reasoning_content"):
        if m.get(key) is not None:
            require("tools" if key != "reasoning_content" else "enable_thinking", f"{where}.{key}")
    return out


def usage(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    if not stats:
        return None
    prompt, completion = stats["prompt_tokens"], stats["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]},
    }


def finish_reason(result: Any) -> str:
    """OpenAI's finish_reason, or ApiError for an end OpenAI has no word for."""
    if result.tool_calls:
        return "tool_calls"
    if result.finish_reason in FINISH_REASONS:
        return FINISH_REASONS[result.finish_reason]
    raise ApiError(503, f"the generation ended early: {result.reason or result.finish_reason}", "server_error", result.finish_reason)


def include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    return bool(options.get("include_usage"))


async def head_of(gateway: Gateway, body: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The keys every reply and chunk of one request shares."""
    name = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else (await gateway.model()).id
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": name, "system_fingerprint": gateway.fingerprint}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    fields = {**generate_fields(body), "on_behalf_of": on_behalf_of(request, body)}
    stream = bool(body.get("stream"))
    usage_chunk = include_usage(body)
    head = await head_of(gateway, body, "chatcmpl")
    async with Generation(gateway.client, gateway.metrics, "openai", fields, PARAMS) as generation:
        if stream:
            return await _stream(request, generation, head, usage_chunk)
        async for _ in generation:
            pass
        result = generation.result
        reply: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.reasoning:
            reply["reasoning_content"] = result.reasoning
        if result.tool_calls:
            reply["tool_calls"] = result.tool_calls
        choice = {"index": 0, "message": reply, "logprobs": choice_logprobs(result.logprobs), "finish_reason": finish_reason(result)}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": usage(result.stats)})


Send = Callable[[Any], Awaitable[None]]


async def _events(request: web.Request, body: Callable[[Send], Awaitable[None]]) -> web.StreamResponse:
    """Server-sent events: ``body(send)`` sends the chunks, then ``[DONE]``; an error once
    the stream started is one more event (the official clients raise APIError on it)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)

    async def send(data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        await response.write(f"data: {text}\n\n".encode())

    try:
        await body(send)
        await send("[DONE]")
    except Exception as exc:
        error = api_error(exc)
        if error is None:
            raise
        await send(error.openai())
    await response.write_eof()
    return response


async def _stream(request: web.Request, generation: Generation, head: dict[str, Any], include_usage: bool) -> web.StreamResponse:
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, entries: Any = ()) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": choice_logprobs(entries), "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}

    async def chunks(send: Send) -> None:
        await send(chunk({"role": "assistant", "content": ""}))
        async for piece in generation:
            if piece.reasoning:
                await send(chunk({"reasoning_content": piece.reasoning}))
            if piece.text or piece.logprobs:
                await send(chunk({"content": piece.text}, entries=piece.logprobs))
        result = generation.result
        if result.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
            await send(chunk({"tool_calls": calls}))
        await send(chunk({}, finish_reason(result)))
        if include_usage:
            await send({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(result.stats)})

    return await _events(request, chunks)


# -- /v1/completions: a raw prompt, no template ---------------------------------------------


def completion_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The ``generate`` request (``raw``) for a legacy completion request, or ApiError (400)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # LiteLLM and others send a list of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise invalid("one prompt per request: the daemon generates one completion at a time", "prompt", "unsupported_value")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise invalid("a prompt of token ids is not supported: send its text", "prompt", "unsupported_value")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("'prompt' must be a non-empty string", "prompt")
    if body.get("suffix"):
        raise invalid("'suffix' (inserting between a prompt and a suffix) is not supported", "suffix", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of > 1 is not supported: the daemon generates one choice per request", "best_of", "unsupported_value")
    top = number(body, "logprobs", int)  # the legacy API's logprobs: how many alternatives (null: none)
    if top is not None:
        require("logprobs", "'logprobs'")
    return {"prompt": prompt, "raw": True, **sampling_fields(body), **({"logprobs": True, "top_logprobs": top} if top is not None else {})}


class TextLogprobs:
    """The legacy completions' ``logprobs`` (tokens, token_logprobs, top_logprobs as
    {token: logprob}, text_offset), offsets counted through the text as it is sent."""

    def __init__(self, offset: int):
        self.offset = offset

    def of(self, entries: Any) -> dict[str, Any] | None:
        if not entries:
            return None
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's legacy text completion: the prompt is the model's input as it is."""
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    fields = {**completion_fields(body), "on_behalf_of": on_behalf_of(request, body)}
    echo = fields["prompt"] if body.get("echo") else ""
    usage_chunk = include_usage(body)
    head = await head_of(gateway, body, "cmpl")

    logprobs = TextLogprobs(len(echo))

    def choice(text: str, finish: str | None, entries: Any = ()) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": logprobs.of(entries), "finish_reason": finish}

    async with Generation(gateway.client, gateway.metrics, "openai", fields, {**PARAMS, "top_logprobs": "logprobs"}) as generation:
        if not body.get("stream"):
            async for _ in generation:
                pass
            result = generation.result
            return web.json_response({**head, "object": "text_completion", "choices": [choice(echo + result.text, finish_reason(result), result.logprobs)],
                                      "usage": usage(result.stats)})
        extra = {"usage": None} if usage_chunk else {}

        async def chunks(send: Send) -> None:
            if echo:
                await send({**head, "object": "text_completion", "choices": [choice(echo, None)], **extra})
            async for piece in generation:
                if piece.text or piece.logprobs:
                    await send({**head, "object": "text_completion", "choices": [choice(piece.text, None, piece.logprobs)], **extra})
            result = generation.result
            await send({**head, "object": "text_completion", "choices": [choice("", finish_reason(result))], **extra})
            if usage_chunk:
                await send({**head, "object": "text_completion", "choices": [], "usage": usage(result.stats)})

        return await _events(request, chunks)


# -- /v1/embeddings ---------------------------------------------------------------------------


def embedding_input(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """OpenAI's ``input`` (a string, strings, token ids, lists of token ids) as the daemon
    takes it; what is none of these is refused here, an empty one by the daemon."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        if all(isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
            return value
    raise invalid("'input' must be a string, an array of strings, an array of token ids or an array of arrays of token ids", "input")


async def embeddings(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    fields = {"input": embedding_input(body.get("input"))}
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid("'encoding_format' must be float or base64", "encoding_format")
    info = await gateway.model(body.get("model"))
    dimensions = number(body, "dimensions", int)
    size = info.describe.get("embedding_length")  # the NPU's is known after its first embedding
    if dimensions is not None and size is not None and dimensions != size:
        raise invalid(f"'dimensions' must be {size}, this model's embedding size: it cannot shorten its embeddings", "dimensions", "unsupported_value")
    result = await gateway.client.embed(**fields, model=info.id)
    if dimensions is not None and dimensions != result["dimensions"]:
        raise invalid(f"'dimensions' must be {result['dimensions']}, this model's embedding size: it cannot shorten its embeddings", "dimensions", "unsupported_value")
    gateway.metrics.embedded("openai", result)

    def encoded(vector: list[float]) -> list[float] | str:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if encoding == "base64" else vector

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(result["embeddings"])]
    name = body.get("model") if isinstance(body.get("model"), str) else info.id
    usage_ = {"prompt_tokens": result["total_tokens"], "total_tokens": result["total_tokens"]}
    return web.json_response({"object": "list", "data": data, "model": name, "usage": usage_})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/embeddings", embeddings),
        web.get("/v1/models", models),
        web.get("/v1/models/{model}", model),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
    ]
