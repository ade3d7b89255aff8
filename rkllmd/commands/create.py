"""create: a model derived from another, on its base's weights (no memory of its own).

Its parameters are checked as ``generate`` checks the same fields, and its template is
compiled once here, so a model that is created is one every request can use.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ..models.registry import PARAMETERS, checked_parameters
from ..protocol import ErrorCode, WireError
from ..schema import OPERATIONS, Operation, parse
from ..templates import FAMILIES, ChatTemplate, TemplateError
from .context import Context, Request
from .models import public

OP = "create"
#: A template sent by a client is compiled on the socket loop: real ones are under 16 KiB.
MAX_TEMPLATE_CHARS = 256 << 10


def execute(ctx: Context, request: Request) -> Future[dict[str, Any]]:
    args = request.args
    parameters = checked_parameters(args["parameters"] or {})
    generate = OPERATIONS["generate"]
    fields = tuple(f for f in generate.fields if f.name in PARAMETERS)
    try:  # the bounds generate holds a request to (max_tokens within daemon.max_tokens_limit, ...)
        parse(Operation("parameters", "", fields), parameters, ctx.config.__getitem__)
    except WireError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, f"parameters: {exc.message}", field="parameters") from None
    template = args["template"] or ""
    if template:
        _check_template(template)

    def change() -> dict[str, Any]:  # on the disk thread: the models file is written and fsynced
        model = ctx.registry.create(args["name"], args["from"], system=args["system"], parameters=parameters, template=template)
        return public(ctx, model.name)

    return ctx.disk.submit(change)


def _check_template(spec: str) -> None:
    if len(spec) > MAX_TEMPLATE_CHARS:
        raise WireError(ErrorCode.INVALID_FIELD, f"template is longer than {MAX_TEMPLATE_CHARS} characters", field="template")
    if spec in FAMILIES:
        return
    if "{{" not in spec and "{%" not in spec:
        raise WireError(ErrorCode.INVALID_FIELD, f"template {spec!r} is neither a family ({', '.join(sorted(FAMILIES))}) nor Jinja text", field="template")
    try:
        ChatTemplate.from_text("the model's template", spec, {})
    except TemplateError as exc:
        raise WireError(ErrorCode.INVALID_FIELD, str(exc), field="template") from None
