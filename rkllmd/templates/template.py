"""A chat template: Jinja text, the special tokens it is given, and how to render it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import jinja2

from ..schema import RESERVED
from .families import FAMILIES, HERMES, LLAMA3, PHI4, Family, guess_markers
from .reasoning import ReasoningSplitter
from .sandbox import Limits, make_environment, render_bounded

MAX_TEMPLATE_CHARS = 1 << 20


class TemplateError(Exception):
    """A chat template cannot be loaded; the message says which and why."""


class RenderError(TemplateError):
    """The template refused the conversation (its own ``raise_exception`` message, an
    undefined value, a sandbox refusal) or ran past its limits."""


@dataclass(frozen=True)
class ChatTemplate:
    """``name``: the family, or where the text came from; ``tokens``: special tokens the
    template is given; ``reasoning``/``tool_calls``: how the model's output is split."""

    name: str
    text: str
    tokens: Mapping[str, str] = field(default_factory=dict)
    reasoning: tuple[str, str] | None = None
    tool_calls: str | None = None
    clock: Callable[[], datetime] = datetime.now
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        if len(self.text) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"chat template {self.name} is longer than {MAX_TEMPLATE_CHARS} characters")
        try:
            self._compiled  # noqa: B018 (compile now: a broken template fails at load, not per request)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {self.name}: line {exc.lineno}: {exc.message}") from None

    @classmethod
    def of_family(cls, family: Family | str, **kw: Any) -> ChatTemplate:
        fam = family if isinstance(family, Family) else FAMILIES[family]
        return cls(fam.name, fam.text(), dict(fam.tokens), fam.reasoning, fam.tool_calls, **kw)

    @classmethod
    def from_text(cls, name: str, text: str, tokens: Mapping[str, str], **kw: Any) -> ChatTemplate:
        """A template of no known family: reasoning markers and tool-call format read from its text."""
        reasoning, tool_calls = guess_markers(text)
        return cls(name, text, dict(tokens), reasoning, tool_calls, **kw)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        return make_environment(lambda: self.clock()).from_string(self.text)

    @cached_property
    def capabilities(self) -> tuple[str, ...]:
        """"completion", then "tools" and "thinking" if requests may ask for them
        (found once by rendering: ``_probe``)."""
        return _probe(self)

    @property
    def reads_clock(self) -> bool:
        """Whether a rendering may hold today's date (``strftime_now``): caches of its
        prefixes are then checked against a fresh rendering before use."""
        return "strftime_now" in self.text

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """Exactly what transformers' ``apply_chat_template(tokenize=False)`` returns."""
        variables = dict(variables or {})
        reserved = RESERVED.intersection(variables)
        if reserved:
            raise RenderError(f"template variable {sorted(reserved)[0]!r} is set by the renderer")
        context = {
            **self.tokens,
            **variables,
            # transformers 5 drops message keys whose value is None and always passes tools.
            "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
            "tools": list(tools) if tools is not None else None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return render_bounded(self._compiled, context, self.limits)
        except jinja2.TemplateError as exc:
            raise RenderError(f"chat template {self.name}: {exc.message or type(exc).__name__}") from None
        except RecursionError:
            raise RenderError(f"chat template {self.name}: recursion too deep") from None
        except Exception as exc:  # the template's own arithmetic, indexing, ...: its error, not ours
            raise RenderError(f"chat template {self.name}: {type(exc).__name__}: {exc}") from None

    def cacheable_prefix(self, system: str) -> str:
        """The text every conversation that starts with this system message starts with.

        The longest prefix the rendering of [system] shares with every rendering of
        [system, user, ...]: it drops what a template writes only at the end of a
        conversation (Phi's end token) and is just the start-of-text when the template
        folds the system text into the first user turn (Gemma 3). A template that refuses
        a system message (Gemma 2) raises RenderError. Where the renderings part inside
        a marker (Phi's ``<|end|><|`` before ``user|>`` or ``endoftext|>``), the prefix
        ends before it, after the last ``>`` or newline: never inside a special token.
        """
        system_message = {"role": "system", "content": system}
        alone = prefix = self.render([system_message], add_generation_prompt=False)
        for turns, generation_prompt in _PROBES:
            prefix = _common_prefix(prefix, self.render([system_message, *turns], generation_prompt))
        if prefix != alone:
            prefix = prefix[: max(prefix.rfind(">"), prefix.rfind("\n")) + 1]
        return prefix

    def fingerprint(self) -> str:
        """Changes whenever rendering could change (part of a binary cache's identity)."""
        canonical = json.dumps([self.text, dict(self.tokens)], sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# Conversations a system message may open, with and without the generation prompt;
# user texts differ from their first character, so no probe shares more than its header.
_PROBES = (
    ((_turn("user", "a"),), False),
    ((_turn("user", "b"),), True),
    ((_turn("user", "c"), _turn("assistant", "d"), _turn("user", "e")), True),
)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


#: What a request may ask of a template beyond completion (``ChatTemplate.capabilities``).
COMPLETION, TOOLS, THINKING = "completion", "tools", "thinking"
#: Tool-call formats the daemon parses (templates/toolcalls.py).
PARSED_TOOL_CALLS = (HERMES, LLAMA3, PHI4)

_CONVERSATION = ({"role": "user", "content": "What is the weather in Oslo?"},)
_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _probe(template: ChatTemplate) -> tuple[str, ...]:
    """The template's capabilities, "completion" first. A template that refuses the probe
    conversation has none beyond completion."""
    moment = template.clock()
    fixed = dataclasses.replace(template, clock=lambda: moment)  # two renderings a midnight apart differ

    def render(**kw: Any) -> str:
        return fixed.render(_CONVERSATION, True, **kw)

    found = [COMPLETION]
    try:
        plain = render()
        if template.tool_calls in PARSED_TOOL_CALLS and render(tools=[_TOOL]) != plain:
            found.append(TOOLS)
        markers = template.reasoning
        if markers is not None and (
            render(variables={"enable_thinking": True}) != render(variables={"enable_thinking": False})
            or ReasoningSplitter.opened_by(plain, markers)
        ):
            found.append(THINKING)
    except RenderError:
        pass
    return tuple(found)
