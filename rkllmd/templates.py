"""Chat templates rendered by the daemon itself.

The daemon, not the runtime, turns messages into prompt text, so a cached prefix (a
conversation holding only its system message) is byte-identical to the start of
every request with that system message, on every backend.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMLTemplate:
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` turns (SmolLM2, Qwen2/2.5/3, ...).

    ``default_system`` is inserted when the first message is not a system message,
    exactly as the model's own Jinja template does.
    """

    name: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        parts = []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for message in messages:
            parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def system_prefix(self, system_text: str) -> str:
        """The text every conversation whose system message is ``system_text`` starts with."""
        return self.render([{"role": "system", "content": system_text}], add_generation_prompt=False)

    def fingerprint(self) -> str:
        """Changes whenever rendering could change (part of a binary cache's identity)."""
        probe = self.render([{"role": "user", "content": "\x00"}])
        return hashlib.sha256(f"{self.name}\x00{probe}".encode()).hexdigest()[:16]


TEMPLATES: dict[str, ChatMLTemplate] = {
    "smollm2": ChatMLTemplate("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "qwen2": ChatMLTemplate("qwen2", "You are a helpful assistant."),
    "qwen2.5": ChatMLTemplate("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "chatml": ChatMLTemplate("chatml", None),
}


def get_template(name: str) -> ChatMLTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None
