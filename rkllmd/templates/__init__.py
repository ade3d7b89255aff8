"""Chat templates rendered by the daemon itself, as the model defines them.

The daemon, not the runtime, turns messages into prompt text (the model's own Jinja
template, rendered with transformers' semantics in a bounded sandbox), so a cached
prefix is byte-identical to the start of every request that should reuse it, on every
backend. The model's output is split back into reasoning, answer and tool calls by
``reasoning`` and ``toolcalls``.
"""

from ..schema import RESERVED, ROLES
from .families import FAMILIES, Family
from .sandbox import Limits
from .source import load, resolve
from .template import ChatTemplate, RenderError, TemplateError

__all__ = ["FAMILIES", "RESERVED", "ROLES", "ChatTemplate", "Family", "Limits", "RenderError", "TemplateError", "get_template", "load", "resolve"]


def get_template(spec: str) -> ChatTemplate:
    """A family's built-in template by name, or one read from a ``.jinja`` or
    ``tokenizer_config.json`` file."""
    return load(spec)
