"""The model families rkllmd knows: each one's own chat template, special tokens, markers.

The templates in ``families/`` are the models' own ``chat_template`` texts, byte for
byte (their sha256 are those of ``../shared/chat-templates/references.json``), copied
from the public tokenizer configs (most via llama.cpp's ``models/templates/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

#: Output formats of tool calls (see ``toolcalls``).
HERMES, LLAMA3, PHI4 = "hermes", "llama3", "phi4"

THINK = ("<think>", "</think>")


@dataclass(frozen=True)
class Family:
    name: str
    #: Special tokens the template is given (``bos_token``, ``eos_token``).
    tokens: dict[str, str] = field(default_factory=dict)
    #: The markers around the model's reasoning, if it reasons in the open.
    reasoning: tuple[str, str] | None = None
    #: How the model writes a tool call (None: no documented format we parse).
    tool_calls: str | None = None

    def text(self) -> str:
        return resources.files(__package__).joinpath("families", f"{self.name}.jinja").read_text(encoding="utf-8")


_QWEN = {"eos_token": "<|im_end|>"}
_LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
_GEMMA = {"bos_token": "<bos>", "eos_token": "<eos>"}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen2.5-instruct", _QWEN, tool_calls=HERMES),
        Family("qwen3", _QWEN, reasoning=THINK, tool_calls=HERMES),
        Family(
            "deepseek-r1-distill-qwen",
            {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
            reasoning=THINK,
        ),
        Family("llama-3.1-instruct", _LLAMA3, tool_calls=LLAMA3),
        Family("llama-3.2-instruct", _LLAMA3, tool_calls=LLAMA3),
        Family("gemma-2-it", _GEMMA),
        Family("gemma-3-it", _GEMMA),
        Family("phi-3.5-mini-instruct", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
        Family("phi-4-mini-instruct", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, tool_calls=PHI4),
        Family("minicpm3", {"bos_token": "<s>", "eos_token": "<|im_end|>"}),
        Family("internlm2-chat", {"bos_token": "<s>", "eos_token": "</s>"}),
        Family("smollm2-instruct", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
        Family("chatml", {"bos_token": "<s>", "eos_token": "<|im_end|>"}),
    )
}


def guess_markers(text: str) -> tuple[tuple[str, str] | None, str | None]:
    """Reasoning markers and tool-call format of a template that names no family,
    read from what the template itself writes."""
    reasoning = THINK if THINK[1] in text else None
    if "<tool_call>" in text:
        tools = HERMES
    elif "<|tool|>" in text:
        tools = PHI4
    elif "<|python_tag|>" in text or "<|eot_id|>" in text and "parameters" in text:
        tools = LLAMA3
    else:
        tools = None
    return reasoning, tools
