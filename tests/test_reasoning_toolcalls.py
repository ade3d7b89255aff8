"""Splitting scripted model outputs: reasoning apart from the answer, tool calls parsed."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from rkllmd.templates import get_template
from rkllmd.templates.reasoning import ReasoningSplitter, split
from rkllmd.templates.toolcalls import parse

THINK = ("<think>", "</think>")


def stream(text: str, cuts: list[int], *, opened: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(THINK, opened=opened)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [splitter.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [splitter.flush()]
    return "".join(p[0] for p in pieces), "".join(p[1] for p in pieces), pieces


def test_qwen3_style_output():
    assert split("<think>\nThe user greets me.\n</think>\n\nHello!", THINK) == ("The user greets me.\n", "Hello!")


def test_deepseek_style_prompt_opens_the_block():
    prompt = get_template("deepseek-r1-distill-qwen").render([{"role": "user", "content": "2+2?"}])
    assert prompt.endswith("<｜Assistant｜><think>\n")
    opened = ReasoningSplitter.opened_by(prompt, THINK)
    assert opened
    assert split("Two and two.\n</think>\n\n4", THINK, opened=opened) == ("Two and two.\n", "4")


def test_qwen3_without_thinking_closes_the_block_in_the_prompt():
    template = get_template("qwen3")
    messages = [{"role": "user", "content": "hi"}]
    assert not ReasoningSplitter.opened_by(template.render(messages, variables={"enable_thinking": False}), THINK)
    assert not ReasoningSplitter.opened_by(template.render(messages), THINK)
    assert split("Hello there.", THINK) == ("", "Hello there.")


def test_marker_later_in_the_answer_is_answer_text():
    assert split("Use <think> tags like <think>this</think>.", THINK) == ("", "Use <think> tags like <think>this</think>.")


def test_unfinished_output():
    assert split("<think>still thinking</thi", THINK) == ("still thinking</thi", "")
    assert split("<thi", THINK) == ("", "<thi")
    assert split("  <think>", THINK) == ("", "")


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_markers_split_anywhere_across_pieces(cuts):
    text = "<think>\nLet me see: 1 < 2 and </thin is not the end.\n</think>\n\nYes: <think> stays."
    reasoning, content, _ = stream(text, cuts)
    assert (reasoning, content) == ("Let me see: 1 < 2 and </thin is not the end.\n", "Yes: <think> stays.")


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=20))
def test_opened_block_split_anywhere(cuts):
    assert stream("a<b\n</think>\n\nc</think>", cuts, opened=True)[:2] == ("a<b\n", "c</think>")


def test_reasoning_streams_as_it_comes():
    splitter = ReasoningSplitter(THINK)
    assert splitter.feed("<think>") == ("", "")
    assert splitter.feed("one ") == ("one ", "")
    assert splitter.feed("two</") == ("two", "")  # "</" may be the start of the marker: held
    assert splitter.feed("think>\n\nAns") == ("", "Ans")
    assert splitter.feed("wer") == ("", "wer")
    assert splitter.flush() == ("", "")


# -- tool calls --------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize(
    "fmt, text, content",
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', ""),
        ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Let me check."),
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', ""),
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', ""),  # stopped at </tool_call>
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
        ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
        ("phi4", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>', ""),
        ("phi4", 'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]', ""),
    ],
)
def test_tool_call_parsed(fmt, text, content):
    parsed = parse(text, fmt)
    assert parsed.tool_calls == [WEATHER]
    assert parsed.content == content and parsed.malformed is None


def test_several_calls():
    two = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>'
    assert [c["function"]["name"] for c in parse(two, "hermes").tool_calls] == ["a", "b"]
    assert [c["function"]["name"] for c in parse('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}', "llama3").tool_calls] == ["a", "b"]
    assert len(parse('<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]<|/tool_call|>', "phi4").tool_calls) == 2


@pytest.mark.parametrize(
    "fmt, text",
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'),
        ("hermes", "<tool_call>\n[1, 2]\n</tool_call>"),
        ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}'),
        ("llama3", '{"parameters": {}}'),
        ("phi4", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": }]<|/tool_call|>'),
    ],
)
def test_malformed_call_is_kept_as_text_and_flagged(fmt, text):
    parsed = parse(text, fmt)
    assert parsed.tool_calls == [] and parsed.content == text and parsed.malformed


def test_one_good_one_bad_call():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call> then <tool_call>{"name": </tool_call>'
    parsed = parse(text, "hermes")
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["a"]
    assert parsed.content == 'then <tool_call>{"name": </tool_call>' and parsed.malformed


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "phi4", None])
def test_plain_answers_are_untouched(fmt):
    for text in ("Paris is in France.", "{not json", "Use {\"a\": 1} as input"):
        parsed = parse(text, fmt)
        assert (parsed.content, parsed.tool_calls) == (text, [])


def test_parsed_calls_go_back_into_the_history():
    """The parsed form is what the templates take in an assistant message's tool_calls."""
    template = get_template("qwen2.5-instruct")
    call = parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "hermes").tool_calls
    text = template.render([{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": call}])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
