"""Parsing the tool calls a model wrote, in the formats its family documents.

* ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, possibly after some text;
* ``llama3`` (Llama 3.1/3.2 JSON tool calling): the whole answer is one JSON object
  ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``), or
  several separated by ``;``;
* ``phi4`` (Phi-4-mini): a JSON list ``[{"name": ..., "arguments": {...}}, ...]`` between
  ``<|tool_call|>`` and ``<|/tool_call|>``, or after ``functools``.

Calls come out as the messages the templates take back in history:
``{"type": "function", "function": {"name": ..., "arguments": {...}}}``. Text that
looks like a call but does not parse is kept as text and flagged, never dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .families import HERMES, LLAMA3, PHI4

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_PHI4_BLOCK = re.compile(r"(?:<\|tool_call\|>(.*?)(?:<\|/tool_call\|>|$)|functools(\[.*\]))", re.DOTALL)


@dataclass
class Parsed:
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    #: Why text that looked like a tool call was left as text (None: nothing malformed).
    malformed: str | None = None


def parse(text: str, fmt: str | None) -> Parsed:
    if fmt == HERMES:
        return _blocks(text, _HERMES_BLOCK, many=False)
    if fmt == PHI4:
        return _blocks(text, _PHI4_BLOCK, many=True)
    if fmt == LLAMA3:
        return _llama3(text)
    return Parsed(text)


def _call(obj: Any, *arg_keys: str) -> dict[str, Any]:
    """One call object -> the history form; ValueError when it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("a tool call must be an object with a string 'name'")
    args: Any = {}
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of tool call {obj['name']!r} must be an object")
    return {"type": "function", "function": {"name": obj["name"], "arguments": args}}


def _blocks(text: str, pattern: re.Pattern[str], *, many: bool) -> Parsed:
    calls, kept, problems, last = [], [], [], 0
    for match in pattern.finditer(text):
        body = next(g for g in match.groups() if g is not None) if any(match.groups()) else ""
        try:
            value = json.loads(body.strip())
            found = [_call(v, "arguments", "parameters") for v in (value if many and isinstance(value, list) else [value])]
        except ValueError as exc:
            problems.append(str(exc))
            continue  # left in the text below
        kept.append(text[last:match.start()])
        last = match.end()
        calls.extend(found)
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return Parsed(content, calls, "; ".join(problems) or None)


def _llama3(text: str) -> Parsed:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body.startswith("{"):
        return Parsed(text)
    try:
        calls = [_call(json.loads(part), "parameters", "arguments") for part in _split_objects(body)]
    except ValueError as exc:
        return Parsed(text, malformed=str(exc))
    return Parsed("", calls)


def _split_objects(body: str) -> list[str]:
    """``{...}; {...}`` -> each object's text (a JSON decoder finds where each ends)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(body):
        _, end = decoder.raw_decode(body, i)
        parts.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return parts
