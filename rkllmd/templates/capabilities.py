"""What a model lets a request ask for: its template's capabilities (``ChatTemplate.capabilities``,
found by rendering it) and "embedding", checked before a request runs.

A model "supports tools" when its template writes the tools into the prompt (a rendering
with a tool list differs from one without) and its output format is one the daemon parses
back into tool calls (``toolcalls``); it "supports thinking" when the daemon splits its
reasoning from its answer (the template's markers are known) and the template either
reacts to ``enable_thinking`` (its renderings with true and false differ) or opens the
reasoning block in the prompt itself (the model always reasons: DeepSeek-R1). Ollama's
``/api/show`` calls these capabilities "tools" and "thinking"; a request asking for one
the model lacks is refused rather than silently ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .template import COMPLETION, THINKING, TOOLS, ChatTemplate

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..outbox import Chat

EMBEDDING = "embedding"


#: Why a model lacks a capability, after "NAME does not support tools/thinking".
_WHY_NOT = {
    TOOLS: "its chat template ({}) does not write tools into the prompt in a form whose calls rkllmd parses back",
    THINKING: "its chat template ({}) neither reads enable_thinking nor opens a reasoning block rkllmd splits off",
}


class CapabilityMissing(ValueError):
    """A request asks for tools or thinking that the model's template cannot do."""

    def __init__(self, message: str, capability: str, field: str):
        super().__init__(message)
        self.capability, self.field = capability, field


def model_capabilities(backend: Backend) -> tuple[str, ...]:
    """What status and /api/show list: the template's, and "embedding" when the backend
    can embed; only "embedding" for a model declared embedding-only (``model.embedding_only``)."""
    if backend.embedding_only:
        return (EMBEDDING,)
    return backend.template.capabilities + ((EMBEDDING,) if backend.embeds else ())


def require_completion(backend: Backend) -> None:
    """Refuse generating with a model declared embedding-only, as Ollama refuses an
    embedding model ("... does not support generate")."""
    if backend.embedding_only:
        name = backend.describe().get("name", "the model")
        raise CapabilityMissing(f"{name} does not support generate: it is declared embedding-only (model.embedding_only)", COMPLETION, "model")


def require_capabilities(backend: Backend, chat: Chat, template: ChatTemplate | None = None) -> None:
    """Refuse tools or thinking the model's template cannot do, as Ollama does ("... does
    not support tools"), rather than drop them silently; ``enable_thinking`` false is fine.
    ``template``: the one that renders the chat, when not the backend's."""
    require_completion(backend)
    template = template or backend.template
    thinking = (chat.variables or {}).get("enable_thinking") is True
    for capability, field, asked in ((THINKING, "enable_thinking", thinking), (TOOLS, "tools", bool(chat.tools))):
        if asked and capability not in template.capabilities:  # thinking first, as Ollama checks
            name = backend.describe().get("name", "the model")
            raise CapabilityMissing(f"{name} does not support {capability}: " + _WHY_NOT[capability].format(template.name), capability, field)
