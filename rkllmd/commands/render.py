"""render: the exact prompt text a chat renders to, as ``generate`` would prefill it.

The template is the loaded model's, a family's by name, or Jinja text the client sent
(the daemon never opens a path a client names). Rendering and counting the tokens run on
the model worker's prompt thread, never on the socket loop: tokenizing a long text takes
a while, and the other clients are answered meanwhile. The sandbox bounds rendering in
time and size (rkllmd/templates/sandbox.py). A template that refuses the chat raises
RenderError, which the socket loop answers as ``invalid_field``.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import Any, Iterator

from ..backends.base import Backend
from ..caches.text import system_text
from ..protocol import ErrorCode, WireError
from ..templates import FAMILIES, ChatTemplate, TemplateError
from .context import Context, Request

OP = "render"
#: A template sent by a client is compiled on the socket loop: real ones are under 16 KiB.
MAX_TEMPLATE_CHARS = 256 << 10


def execute(ctx: Context, request: Request) -> Future[dict[str, Any]]:
    args, model = request.args, request.model
    assert model is not None
    messages = checked(args["messages"], ctx.config.daemon.max_prompt_chars)
    loaded = ctx.pool.get(model.weights.name)
    if loaded is None:
        raise WireError(ErrorCode.NOT_FOUND, f"model {model.model.name} is not loaded: load it first (the load operation, or a generation)", model=model.model.name)
    if args["template"] is None and model.template:
        args = {**args, "template": model.template}
    return loaded.worker.with_prompts(functools.partial(_render, args=args, messages=messages))  # a partial pickles: to a runner process


def _render(backend: Backend, args: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    renderer = backend if args["template"] is None else _template(args["template"], backend.template)
    text = renderer.render(messages, args["add_generation_prompt"], tools=args["tools"], variables=args["vars"])
    return {"text": text, "tokens": backend.count_tokens(text)}


def checked(messages: list[dict[str, Any]], max_chars: int) -> list[dict[str, Any]]:
    """The messages, if their text (content, and whatever else they carry to the template)
    fits ``daemon.max_prompt_chars`` and holds no NUL, with system text ending at its last
    character that is not a line break (docs/caches.md)."""
    texts = [text for m in messages for key, value in m.items() if key != "role" for text in _strings(value)]
    total = sum(map(len, texts))
    if total > max_chars:
        raise WireError(ErrorCode.TOO_LARGE, f"the prompt is {total} characters; the limit is {max_chars}", field="messages")
    if any("\x00" in text for text in texts):
        raise WireError(ErrorCode.INVALID_FIELD, "messages must not contain NUL", field="messages")
    return [{**m, "content": system_text(m["content"])} if m["role"] == "system" else m for m in messages]


def _strings(value: Any) -> Iterator[str]:
    """Every string in ``value``, however nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


def _template(spec: str | None, loaded: ChatTemplate) -> ChatTemplate:
    """A family by name, or Jinja text given the loaded model's special tokens."""
    if spec is None:
        return loaded
    if len(spec) > MAX_TEMPLATE_CHARS:
        raise WireError(ErrorCode.INVALID_FIELD, f"template is longer than {MAX_TEMPLATE_CHARS} characters", field="template")
    if spec in FAMILIES:
        return ChatTemplate.of_family(spec)
    if "{{" not in spec and "{%" not in spec:
        raise WireError(ErrorCode.INVALID_FIELD, f"template {spec!r} is neither a family ({', '.join(sorted(FAMILIES))}) nor Jinja text", field="template")
    try:
        return ChatTemplate.from_text("the request's template", spec, loaded.tokens)
    except TemplateError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, str(exc), field="template") from None
