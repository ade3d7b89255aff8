"""Ollama's API: /api/tags, /api/ps, /api/version, /api/show, /api/chat, /api/generate,
/api/embed and /api/embeddings (the daemon's ``embed``, protocol 1.7: /api/embed's are
L2-normalised, the older /api/embeddings' the mean as it is, as Ollama returns them),
/api/create, /api/copy, /api/delete, /api/pull.

Streams are NDJSON, one object a line, as Ollama sends them (``stream`` defaults to
true there). ``options`` map onto ``generate``; options that only tune Ollama's own
runtime (num_ctx, num_thread, ...) are ignored, as Ollama ignores options a model
does not use.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import Any

from aiohttp import web

from rkllmctl.errors import DaemonError
from rkllmd import __version__

from .errors import ApiError, api_error, invalid
from .gateway import Gateway, ModelInfo
from .generation import Generation, number, on_behalf_of, require, stops, text_content

#: The Ollama API release these endpoints follow (clients check it against their minimum).
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
#: Ollama option -> (generate field, type).
OPTIONS = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "num_predict": ("max_tokens", int),
    "repeat_penalty": ("repeat_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "seed": ("seed", int),
}


def iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def now() -> str:
    return iso(datetime.datetime.now(datetime.timezone.utc))


def details(info: ModelInfo) -> dict[str, Any]:
    params = info.describe.get("params")
    family = info.describe.get("architecture") or info.describe.get("backend", "")
    return {
        "parent_model": info.entry.get("base") or "",
        "format": "gguf" if info.describe.get("backend") == "cpu" else "rkllm",
        "family": family,
        "families": [family],
        "parameter_size": f"{params / 1e6:.0f}M" if params and params < 1e9 else f"{params / 1e9:.1f}B" if params else "",
        "quantization_level": info.describe.get("dtype", ""),
    }


def entry(info: ModelInfo) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(info.describe, sort_keys=True).encode()).hexdigest()
    path = info.describe.get("path")
    return {
        "name": info.ollama_name,
        "model": info.ollama_name,
        "modified_at": iso(datetime.datetime.fromtimestamp(info.created, datetime.timezone.utc)),
        "size": _size(path) if path else 0,
        "digest": digest,
        "details": details(info),
    }


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


async def tags(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    return web.json_response({"models": [entry(info) for info in await gateway.models()]})


#: Ollama's "never expires" (Go's largest time), for a model kept until the daemon stops.
NEVER = "2262-04-11T23:47:16Z"


async def ps(request: web.Request) -> web.Response:
    """The loaded models: each name whose weights are loaded, with its weights' size and
    when they are unloaded if left idle."""
    gateway: Gateway = request.app["gateway"]
    items = []
    for info in await gateway.models():
        if info.loaded is None:
            continue
        expires = info.loaded.get("expires_at")
        when = NEVER if expires is None else iso(datetime.datetime.fromtimestamp(expires, datetime.timezone.utc))
        items.append({**entry(info), "size": info.loaded["size"], "expires_at": when, "size_vram": 0, "context_length": context_length(info)})
    return web.json_response({"models": items})


def context_length(info: ModelInfo) -> int:
    return int(info.describe.get("context_length") or 0)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION, "rkllmd_version": __version__})


async def show(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    info = await gateway.model(body.get("model") or body.get("name"))
    architecture = info.describe.get("architecture") or "unknown"
    model_info = {
        "general.architecture": architecture,
        "general.parameter_count": info.describe.get("params") or 0,
        f"{architecture}.context_length": context_length(info),
    }
    names = {field: option for option, (field, _) in OPTIONS.items()}  # max_tokens is Ollama's num_predict
    own = sorted((names.get(key, key), value) for key, value in info.entry.get("parameters", {}).items())
    parameters = "\n".join(f"{key:<30} {value}" for key, value in own)
    modelfile = [f"FROM {info.entry.get('base') or info.describe.get('path') or info.id}"]
    if info.entry.get("system") is not None:
        modelfile.append(f'SYSTEM """{info.entry["system"]}"""')
    if info.entry.get("template"):
        modelfile.append(f'TEMPLATE """{info.entry["template"]}"""')
    modelfile += [f"PARAMETER {key} {value}" for key, value in own]
    return web.json_response({
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": parameters,
        "template": info.entry.get("template") or "",
        "system": info.entry.get("system") or "",
        "details": details(info),
        "model_info": model_info,
        "capabilities": info.describe.get("capabilities") or ["completion"],  # from the model's template (status, protocol 1.4)
        "modified_at": entry(info)["modified_at"],
    })


async def embedding_model(gateway: Gateway, body: dict[str, Any]) -> ModelInfo:
    """The model an embedding request names: Ollama requires one, and answers 404 for a
    model it does not have."""
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("model is required", "model")
    return await gateway.model(name)


async def embed(request: web.Request) -> web.Response:
    """/api/embed as Ollama's EmbedHandler (server/routes.go): ``input`` a string or
    strings (an empty string: no input, no embeddings), ``truncate`` (default true; false
    refuses a long input in its words), ``keep_alive`` (how long the model stays loaded),
    ``options`` accepted, L2-normalised embeddings and ``prompt_eval_count``."""
    gateway: Gateway = request.app["gateway"]
    started = time.monotonic()
    body = await gateway.json_body(request)
    value = body.get("input")
    if isinstance(value, str):
        inputs = [value] if value else []
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs = value
    elif value is None:
        inputs = []
    else:
        raise invalid("invalid input type", "input")
    info = await embedding_model(gateway, body)
    loaded = time.monotonic()
    if not inputs:
        return web.json_response({"model": body.get("model") or info.ollama_name, "embeddings": []})
    try:
        result = await gateway.client.embed(input=inputs, model=info.id, truncate=body.get("truncate") is not False, keep_alive=body.get("keep_alive"))
    except DaemonError as exc:
        if exc.name == "context_overflow":
            raise ApiError(400, "input length exceeds maximum context length", code="context_length_exceeded") from None
        raise
    gateway.metrics.embedded("ollama", result)
    done = time.monotonic()
    return web.json_response({
        "model": body.get("model") or info.ollama_name,
        "embeddings": result["embeddings"],
        "total_duration": int((done - started) * 1e9),
        "load_duration": int((loaded - started) * 1e9),
        "prompt_eval_count": result["total_tokens"],
    })


async def embeddings(request: web.Request) -> web.Response:
    """The older /api/embeddings (Ollama's EmbeddingsHandler): ``prompt`` -> ``embedding``,
    the mean as it is (not normalised); an empty prompt only loads the model."""
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    info = await embedding_model(gateway, body)
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        return web.json_response({"embedding": []})
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string", "prompt")
    result = await gateway.client.embed(input=prompt, model=info.id, normalize=False, keep_alive=body.get("keep_alive"))
    gateway.metrics.embedded("ollama", result)
    return web.json_response({"embedding": result["embeddings"][0]})


def options(body: dict[str, Any]) -> dict[str, Any]:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise invalid("'options' must be an object", "options")
    fields = {field: number(opts, key, kind, f"options.{key}") for key, (field, kind) in OPTIONS.items()}
    if fields["max_tokens"] is not None and fields["max_tokens"] < 0:
        fields["max_tokens"] = None  # -1 (-2): "until the model stops (or the context is full)": the daemon's default
    fields["stop"] = stops(opts.get("stop"), "options.stop")
    fmt = body.get("format")
    if fmt:  # "json", or a JSON Schema ("" and null: plain text, as Ollama)
        require("format", "'format'")
        if fmt != "json" and not isinstance(fmt, dict):
            raise invalid("'format' must be \"json\" or a JSON Schema (an object)", "format")
        fields["format"] = fmt
    if body.get("logprobs"):
        require("logprobs", "'logprobs'")
        fields["logprobs"] = True
        fields["top_logprobs"] = number(body, "top_logprobs", int)
    if body.get("images"):
        raise invalid("images are not supported", "images")
    think = body.get("think")
    if think is not None:
        require("enable_thinking", "'think'")
        fields["enable_thinking"] = bool(think)
    if body.get("tools"):
        require("tools", "'tools'")
        fields["tools"] = body["tools"]
    if body.get("rkllm_cache") is not None:
        fields["cache"] = body["rkllm_cache"]
    fields["model"] = model_name(body)
    fields["keep_alive"] = body.get("keep_alive")  # the daemon checks it (a duration, or seconds)
    return fields


def model_name(body: dict[str, Any]) -> str | None:
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise invalid("'model' must be a string")
    return name or None


async def load(gateway: Gateway, body: dict[str, Any], reply: dict[str, Any]) -> web.Response:
    """Ollama's empty request: load the model (``done_reason`` "load"), or with
    ``keep_alive`` 0 unload it ("unload")."""
    try:
        result = await gateway.client.call("load", model=model_name(body), keep_alive=body.get("keep_alive"))
    except DaemonError as exc:
        raise api_error(exc) from None  # type: ignore[misc]
    unloading = body.get("keep_alive") in (0, "0", 0.0, "0s", "0m")
    return web.json_response({"model": result["model"], "created_at": now(), **reply, "done": True, "done_reason": "unload" if unloading else "load"})


def chat_message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
        raise invalid(f"{where}.role must be system, user, assistant or tool")
    if m.get("images"):
        raise invalid(f"{where}: images are not supported")
    # Keys of Ollama's own go to the daemon's names; any other reaches the template as it is.
    out: dict[str, Any] = {k: v for k, v in m.items() if k not in ("thinking", "tool_name", "tool_calls", "images")}
    out["content"] = text_content(m.get("content"), f"{where}.content")
    if m.get("thinking"):
        require("enable_thinking", f"{where}.thinking")
        out["reasoning_content"] = m["thinking"]
    if m.get("tool_calls"):
        require("tools", f"{where}.tool_calls")
        out["tool_calls"] = [{"id": f"call_{n}", "type": "function", "function": c.get("function", c)} for n, c in enumerate(m["tool_calls"])]
    if m.get("tool_name"):
        out["name"] = m["tool_name"]
    return out


def _arguments(arguments: Any) -> Any:
    """Ollama gives a tool call's arguments as an object; the daemon as JSON text (protocol 1.2)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _logprobs(entries: Any) -> dict[str, Any]:
    """Ollama's ``logprobs``: the same entries as the daemon's ({token, logprob, bytes, top_logprobs})."""
    return {"logprobs": list(entries)} if entries else {}


def durations(result: Any) -> dict[str, Any]:
    """Ollama's counts and nanosecond durations from the daemon's stats."""
    stats = result.stats or {}
    ns = lambda ms: int((ms or 0) * 1e6)  # noqa: E731
    return {
        "done_reason": result.finish_reason,
        "total_duration": ns(stats.get("total_ms")),
        "load_duration": 0,
        "prompt_eval_count": stats.get("prompt_tokens", 0),
        "prompt_eval_duration": ns(stats.get("prefill_ms")),
        "eval_count": stats.get("completion_tokens", 0),
        "eval_duration": ns(stats.get("decode_ms")),
    }


async def chat(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    if not isinstance(body.get("messages"), list):
        raise invalid("'messages' must be an array")
    if not body["messages"]:  # Ollama's way to load (or unload) a model
        return await load(gateway, body, {"message": {"role": "assistant", "content": ""}})
    fields = {"messages": [chat_message(m, i) for i, m in enumerate(body["messages"])], **options(body)}

    def piece_line(piece: Any) -> dict[str, Any]:
        message = {"role": "assistant", "content": piece.text}
        if piece.reasoning:
            message["thinking"] = piece.reasoning
        return {"message": message, **_logprobs(piece.logprobs)}

    def last_line(result: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if result.tool_calls:
            message["tool_calls"] = [{"function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}} for c in result.tool_calls]
        return {"message": message}

    def whole(result: Any) -> dict[str, Any]:
        message = {**last_line(result)["message"], "content": result.text}
        if result.reasoning:
            message["thinking"] = result.reasoning
        return {"message": message, **_logprobs(result.logprobs)}

    return await _respond(request, gateway, body, fields, piece_line, last_line, whole, "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    prompt = body.get("prompt")
    if body.get("suffix") or body.get("context"):
        raise invalid("'suffix' and 'context' are not supported")
    if body.get("template"):
        raise invalid("'template' is not supported: the daemon renders the model's own chat template ('raw': true sends a prompt as it is)")
    if body.get("raw") and body.get("system"):  # Ollama's own words (server/routes.go)
        raise invalid("raw mode does not support template, system, or context")
    if prompt is None or prompt == "":  # Ollama's way to load (or unload) a model
        return await load(gateway, body, {"response": ""})
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string")
    if body.get("raw"):  # the prompt as it is: no template, no system message
        fields = {"prompt": prompt, "raw": True, **options(body)}
        if fields.get("enable_thinking") is False:  # "think": false asks nothing of a raw prompt
            del fields["enable_thinking"]
    else:
        fields = {"prompt": prompt, "system": body.get("system"), **options(body)}

    def piece_line(piece: Any) -> dict[str, Any]:
        return {"response": piece.text, **({"thinking": piece.reasoning} if piece.reasoning else {}), **_logprobs(piece.logprobs)}

    def whole(result: Any) -> dict[str, Any]:
        return {"response": result.text, **({"thinking": result.reasoning} if result.reasoning else {}), **_logprobs(result.logprobs)}

    return await _respond(request, gateway, body, fields, piece_line, lambda result: {"response": ""}, whole, "generate")


async def _respond(request, gateway: Gateway, body, fields, piece_line, last_line, whole, verb: str) -> web.StreamResponse:
    """Run the generation; one JSON object, or NDJSON lines ending with the stats line.
    What the model cannot do is refused in Ollama's words (server/routes.go); ``verb``
    ("chat", "generate") names the endpoint, as an embedding model's refusal does."""
    try:
        return await _run(request, gateway, body, fields, piece_line, last_line, whole)
    except DaemonError as exc:
        capability = exc.details.get("capability")
        if capability == "tools":  # "%s %w": the model's full name, then the error
            raise ApiError(400, f"{(await gateway.model(body.get('model'))).ollama_name} does not support tools") from None
        if capability == "completion":  # an embedding-only model: "%q does not support chat" (or generate)
            raise ApiError(400, f"{json.dumps(str(body.get('model') or ''))} does not support {verb}") from None
        if capability == "thinking":  # "%q does not support thinking" of the request's model name
            raise ApiError(400, f"{json.dumps(str(body.get('model') or ''))} does not support thinking") from None
        raise


async def _run(request, gateway: Gateway, body, fields, piece_line, last_line, whole) -> web.StreamResponse:
    name = body.get("model")
    fields = {**fields, "on_behalf_of": on_behalf_of(request, body)}
    async with Generation(gateway.client, gateway.metrics, "ollama", fields) as generation:
        if body.get("stream") is False:
            async for _ in generation:
                pass
            result = generation.result
            return web.json_response({"model": name, "created_at": now(), **whole(result), "done": True, **durations(result)})
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)

        async def send(line: dict[str, Any]) -> None:
            await response.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")

        try:
            async for piece in generation:
                await send({"model": name, "created_at": now(), **piece_line(piece), "done": False})
            result = generation.result
            await send({"model": name, "created_at": now(), **last_line(result), "done": True, **durations(result)})
        except Exception as exc:
            error = api_error(exc)
            if error is None:
                raise
            await send(error.ollama())  # the official client raises ResponseError on this line
        await response.write_eof()
        return response


async def create(request: web.Request) -> web.StreamResponse:
    """A model derived from another (``from``) with its own ``system``, ``parameters`` and
    ``template``; the status lines Ollama streams, or one ``{"status": "success"}``."""
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    name, base = body.get("model") or body.get("name"), body.get("from")
    if not isinstance(name, str) or not name:
        raise invalid("'model' must name the model to create")
    if not isinstance(base, str) or not base:
        raise invalid("'from' must name the model it derives from (a Modelfile, files and adapters are not supported)")
    if body.get("files") or body.get("adapters") or body.get("modelfile"):
        raise invalid("only 'from', 'system', 'parameters' and 'template' are supported: the daemon derives models, it does not import files")
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise invalid("'parameters' must be an object")
    try:
        await gateway.client.call("create", name=name, **{"from": base}, system=body.get("system"), parameters=parameters or None,
                                  template=body.get("template") or None)
    except DaemonError as exc:
        raise api_error(exc) from None  # type: ignore[misc]
    statuses = ["using existing layer", "creating new layer", "writing manifest", "success"]
    if body.get("stream") is False:
        return web.json_response({"status": "success"})
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    for status in statuses:
        await response.write(json.dumps({"status": status}).encode() + b"\n")
    await response.write_eof()
    return response


async def copy(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    source, destination = body.get("source"), body.get("destination")
    if not isinstance(source, str) or not isinstance(destination, str) or not source or not destination:
        raise invalid("'source' and 'destination' must name models")
    try:
        await gateway.client.call("copy", source=source, destination=destination)
    except DaemonError as exc:
        raise api_error(exc) from None  # type: ignore[misc]
    return web.Response(status=200)


async def delete(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("'model' must name the model to delete")
    try:
        await gateway.client.call("delete", name=name)
    except DaemonError as exc:
        raise api_error(exc) from None  # type: ignore[misc]
    return web.Response(status=200)


async def pull(request: web.Request) -> web.StreamResponse:
    """A model from the Hugging Face hub (``hf.co/OWNER/REPO[:TAG]``, as Ollama pulls them):
    the statuses Ollama streams, or one ``{"status": "success"}``. An error before the first
    status is an HTTP error; one after it (a corrupt download) the stream's last line, as
    Ollama sends it. A client that goes away cancels the pull (the next one resumes)."""
    gateway: Gateway = request.app["gateway"]
    body = await gateway.json_body(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("'model' must name the model to pull (hf.co/OWNER/REPO[:TAG])")
    statuses = gateway.client.pull(source=name, name=None)
    try:
        first = await statuses.__anext__()
        if body.get("stream") is False:
            async for _ in statuses:
                pass
            return web.json_response({"status": "success"})
    except DaemonError as exc:
        raise api_error(exc) from None  # type: ignore[misc]
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)

    def line(event: Any) -> bytes:  # Ollama's ProgressResponse leaves out empty fields (Go's omitempty: a 0 too)
        fields = {key: value for key, value in (("digest", event.digest), ("total", event.total), ("completed", event.completed)) if value}
        return json.dumps({"status": event.status, **fields}).encode() + b"\n"

    try:
        await response.write(line(first))
        async for event in statuses:
            await response.write(line(event))
    except Exception as exc:
        error = api_error(exc)
        if error is None:
            raise
        await response.write(json.dumps(error.ollama()).encode() + b"\n")  # the official client raises ResponseError on it
    finally:
        await statuses.aclose()
    await response.write_eof()
    return response


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/pull", pull),
        web.post("/api/create", create),
        web.post("/api/copy", copy),
        web.delete("/api/delete", delete),
        web.get("/api/tags", tags),
        web.get("/api/ps", ps),
        web.get("/api/version", version),
        web.post("/api/show", show),
        web.post("/api/chat", chat),
        web.post("/api/generate", generate),
        web.post("/api/embed", embed),
        web.post("/api/embeddings", embeddings),
    ]
