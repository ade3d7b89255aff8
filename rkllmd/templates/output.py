"""A generation's raw output as the stream sends it: reasoning apart, tool calls parsed.

The rule clients rely on (docs/protocol.md): the ``text`` of a stream's token messages,
joined, is the whole answer and nothing but the answer; ``reasoning`` likewise is the
whole reasoning. Text that may be a tool call is therefore held back from the stream
(from its family's opening marker on) until the output ends; if it parses, the calls
go in ``done`` and their text is sent nowhere; if not, it is sent as answer text and
``done`` says why it did not parse. Stop strings and ``max_tokens`` act on the raw
output before this (a stop string may end a generation inside its reasoning).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from .families import HERMES, LLAMA3, PHI4
from .reasoning import ReasoningSplitter
from .template import ChatTemplate
from .toolcalls import parse

#: Where a tool call may begin, by format: anywhere in the answer, or only at its start.
_ANYWHERE = {HERMES: ("<tool_call>",), PHI4: ("<|tool_call|>", "functools[")}
_AT_START = {LLAMA3: ("<|python_tag|>", "{")}


class OutputSplitter:
    """``feed(piece) -> (reasoning, text)`` to send now; ``finish()`` the same for what was
    held back, after which ``reasoning``, ``tool_calls`` and ``tool_call_error`` are final."""

    def __init__(self, markers: tuple[str, str] | None, *, opened: bool = False, tool_format: str | None = None):
        self._splitter = ReasoningSplitter(markers, opened=opened) if markers else None
        self._gate = _ToolCallGate(tool_format) if tool_format in (*_ANYWHERE, *_AT_START) else None
        self._reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []  # in the templates' history form (arguments a map)
        self.tool_call_error: str | None = None

    @classmethod
    def for_prompt(cls, template: ChatTemplate, prompt: str, *, tools: bool, tool_format: str | None = None) -> OutputSplitter:
        """The splitter of a request: reasoning markers from its template (the block may be
        opened by the prompt itself), tool calls parsed only when the request offered tools,
        in the template's format or ``tool_format`` (the one a forced call was written in)."""
        opened = cls.reasoning_opened(template, prompt)
        return cls(template.reasoning, opened=opened, tool_format=(tool_format or template.tool_calls) if tools else None)

    @staticmethod
    def reasoning_opened(template: ChatTemplate, prompt: str) -> bool:
        """Whether ``prompt`` itself opened a reasoning block, which the output then continues."""
        return template.reasoning is not None and ReasoningSplitter.opened_by(prompt, template.reasoning)

    @property
    def reasoning(self) -> str | None:
        """The whole reasoning so far; None when the output opened no reasoning block."""
        return "".join(self._reasoning) if self._splitter is not None and self._splitter.entered else None

    def feed(self, piece: str) -> tuple[str, str]:
        if self._splitter is None:
            return "", self._answer(piece)
        reasoning, text = self._splitter.feed(piece)
        return self._note(reasoning), self._answer(text)

    def finish(self) -> tuple[str, str]:
        reasoning, text = self._splitter.flush() if self._splitter is not None else ("", "")
        reasoning, text = self._note(reasoning), self._answer(text)
        if self._gate is not None:
            held, self.tool_calls, self.tool_call_error = self._gate.finish()
            text += held
        return reasoning, text

    def _note(self, reasoning: str) -> str:
        self._reasoning.append(reasoning)
        return reasoning

    def _answer(self, text: str) -> str:
        return self._gate.feed(text) if self._gate is not None and text else text


class _ToolCallGate:
    """Holds answer text back from where a tool call may begin."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.anywhere = _ANYWHERE.get(fmt, ())
        self.at_start = _AT_START.get(fmt, ())
        self._held = ""
        self._captured: str | None = None  # from a call's opening marker on
        self._started = False  # answer text other than whitespace has been seen

    def feed(self, text: str) -> str:
        if self._captured is not None:
            self._captured += text
            return ""
        text, self._held = self._held + text, ""
        if self.at_start and not self._started:
            lead = text.lstrip()
            if any(lead.startswith(m) for m in self.at_start):
                self._captured = text
                return ""
            if not lead or any(m.startswith(lead) for m in self.at_start):
                self._held = text
                return ""
            self._started = True
        starts = [i for i in (text.find(m) for m in self.anywhere) if i >= 0]
        if starts:
            cut = min(starts)
            self._captured = text[cut:]
            return text[:cut]
        keep = max((n for m in self.anywhere for n in range(min(len(m) - 1, len(text)), 0, -1) if text.endswith(m[:n])), default=0)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[dict[str, Any]], str | None]:
        """(text still to send, calls, why text that looked like calls did not parse)."""
        held, self._held = self._held, ""
        if self._captured is None:
            return held, [], None
        parsed = parse(self._captured, self.fmt)
        if not parsed.tool_calls and parsed.malformed is None:  # "{...}" that is not a call: an answer
            return self._captured, [], None
        return parsed.content, parsed.tool_calls, parsed.malformed


def wire_tool_calls(calls: list[dict[str, Any]], ids: Iterator[int]) -> list[dict[str, Any]]:
    """Calls as ``done`` carries them (OpenAI's shape): ids ``call_<n>``, arguments a JSON string."""
    return [
        {
            "id": f"call_{next(ids)}",
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)},
        }
        for call in calls
    ]
