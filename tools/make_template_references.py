"""Make tests/data/chat-template-message-keys.json: transformers' renderings of messages
that carry more than ``role`` and ``content``.

A chat template may read any key of a message: Phi-4-mini's documented way to give it
tools is a ``tools`` key (JSON text) on the system message, MiniCPM3 reads an assistant
turn's ``thought``, a template may read a ``name`` or a ``tool_call_id``. transformers
passes a message's keys to the template as they are (leaving out those whose value is
None), so the daemon must too. An OpenAI client sends a tool call's ``arguments`` as
JSON text where transformers' templates expect a map (``arguments | tojson``): the daemon
parses it (and passes on as it is a string that is not JSON text of an object), and
renders a nil ``content`` of a turn that only calls tools as "".

Each record holds ``messages``, what transformers was given (arguments as maps), and
``wire_messages``, what a client sends the daemon for the same conversation (arguments
as OpenAI's JSON text); then ``rendered`` (with ``rendered_sha256``) or ``error``
(``{type, message}``) as transformers' public ``apply_chat_template(tokenize=False)``
returned or raised. Templates are the families' own texts (rkllmd/templates/families,
each given its special tokens as the model's tokenizer would) or, for ``template``
records, the Jinja text in the record.

Needs transformers and jinja2, in a scratch venv rather than the project's (the tests
never import transformers; they read the file this writes):

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install transformers jinja2
    /tmp/tf/bin/python tools/make_template_references.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "tests" / "data" / "chat-template-message-keys.json"

from rkllmd.templates.families import FAMILIES  # noqa: E402 (after the checkout is importable)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]},
    },
}
# Phi-4-mini's model card: the tools as JSON text in the system message's "tools" key.
PHI4_TOOLS = json.dumps([{"name": "get_weather", "description": "Get the current weather for a city.",
                          "parameters": {"city": {"description": "The city", "type": "str"}}}])
#: Llama 3.2 writes today's date unless it is given one.
DATE = {"date_string": "27 Nov 2026"}
#: Every message as the template sees it, keys in order.
PROBE = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}<gen>{% endif %}"


def tool_round_trip() -> list[dict]:
    """A tool call and its result, as an OpenAI client sends them back (ids) but for the
    forms ``wire`` makes."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather like in Paris right now?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call_7", "name": "get_weather", "content": "{\"temperature_c\": 21, \"condition\": \"sunny\"}"},
    ]


def every_key() -> list[dict]:
    """Keys of every kind on every role; one call's arguments that are not JSON at all."""
    return [
        {"role": "system", "content": "Be brief.", "name": "house_rules", "tools": PHI4_TOOLS},
        {"role": "user", "content": "Quel temps fait-il à Paris ?", "name": "amélie", "metadata": {"lang": "fr", "tags": ["météo", 1, 2.5, True]}},
        {"role": "assistant", "content": "", "thought": "I should ask the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, "index": 0},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "Lyon, please"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "19 C", "extra": None},
    ]


def cases() -> list[dict]:
    """(family or template, case, messages, tools, kwargs, add_generation_prompt)."""
    out = [
        {"family": "phi-4-mini-instruct", "case": "system_tools_key", "messages": [
            {"role": "system", "content": "You are a helpful assistant with some tools.", "tools": PHI4_TOOLS},
            {"role": "user", "content": "What is the weather like in Paris today?"}], "tools": None, "kwargs": {}, "add_generation_prompt": True},
        {"family": "minicpm3", "case": "assistant_thought_key", "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5.", "thought": "Two plus three is five."},
            {"role": "user", "content": "And 4 + 4?"}], "tools": None, "kwargs": {}, "add_generation_prompt": True},
        {"template": PROBE, "case": "every_key_reaches_the_template", "messages": every_key(), "tools": None, "kwargs": {},
         "add_generation_prompt": False},
    ]
    for family in sorted(FAMILIES):
        out.append({"family": family, "case": "openai_tool_round_trip", "messages": tool_round_trip(), "tools": [WEATHER],
                    "kwargs": DATE if family == "llama-3.2-instruct" else {}, "add_generation_prompt": True})
    return out


def wire(messages: list[dict]) -> list[dict]:
    """The same conversation as an OpenAI client sends it: arguments as JSON text, and a
    turn that only calls tools with a nil content (the daemon renders it as "", which
    every template takes, where a missing content fails most of them)."""
    sent = copy.deepcopy(messages)
    for message in sent:
        for call in message.get("tool_calls") or ():
            if isinstance(call["function"]["arguments"], dict):
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        if message.get("tool_calls") and message.get("content") == "":
            message["content"] = None
    return sent


def render(case: dict) -> dict:
    import transformers
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = dict(FAMILIES[case["family"]].tokens) if "family" in case else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), **tokens)
    tokenizer.chat_template = FAMILIES[case["family"]].text() if "family" in case else case["template"]
    record = {**case, "wire_messages": wire(case["messages"]), "tokens": tokens,
              "transformers": transformers.__version__, "jinja2": __import__("jinja2").__version__}
    try:
        text = tokenizer.apply_chat_template(copy.deepcopy(case["messages"]), tools=case["tools"], tokenize=False,
                                             add_generation_prompt=case["add_generation_prompt"], **case["kwargs"])
    except Exception as exc:  # the template's own refusal (raise_exception): recorded as such
        record["error"] = {"type": type(exc).__name__, "message": str(exc)}
    else:
        record["rendered"] = text
        record["rendered_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return record


def main() -> None:
    records = [render(case) for case in cases()]
    OUTPUT.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(records)} records ({sum('error' in r for r in records)} refusals) in {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
