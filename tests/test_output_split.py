"""A generation's raw output as the stream sends it (rkllmd/templates/output.py), on
scripted outputs cut anywhere: reasoning apart, tool-call text held back and parsed,
stop strings acting on the raw output before the split, as the backends apply them."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, strategies as st

from rkllmd.backends.stops import StopMatcher
from rkllmd.templates import get_template
from rkllmd.templates.families import HERMES, LLAMA3, PHI4
from rkllmd.templates.output import OutputSplitter, wire_tool_calls

THINK = ("<think>", "</think>")
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PARSED = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def run(splitter: OutputSplitter, text: str, cuts: list[int] = (), stops: tuple[str, ...] = ()) -> tuple[str, str, list[tuple[str, str]]]:
    """Feed ``text`` in pieces cut at ``cuts`` through a stop matcher (as a backend does),
    then the splitter; return the joined reasoning, the joined answer and every piece sent."""
    matcher = StopMatcher(stops)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    sent = []
    for a, b in zip(bounds, bounds[1:]):
        sent.append(splitter.feed(matcher.feed(text[a:b])))
        if matcher.stopped:
            break
    else:
        sent.append(splitter.feed(matcher.flush()))
    sent.append(splitter.finish())
    return "".join(r for r, _ in sent), "".join(t for _, t in sent), sent


cut_lists = st.lists(st.integers(min_value=0, max_value=400), max_size=25)


@given(cut_lists)
def test_hermes_call_after_reasoning_is_parsed_and_never_streamed(cuts):
    splitter = OutputSplitter(THINK, tool_format=HERMES)
    reasoning, text, sent = run(splitter, f"<think>\nParis, so call it.\n</think>\n\nLet me check. <tool_call>\n{CALL}\n</tool_call>", cuts)
    assert (reasoning, text) == ("Paris, so call it.\n", "Let me check. ")
    assert splitter.reasoning == reasoning and splitter.tool_calls == [PARSED] and splitter.tool_call_error is None
    assert not any("<tool" in t or "<" in r for r, t in sent)


@given(cut_lists)
def test_a_malformed_call_is_sent_as_text_at_the_end_and_flagged(cuts):
    raw = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call> sorry'
    splitter = OutputSplitter(None, tool_format=HERMES)
    reasoning, text, sent = run(splitter, raw, cuts)
    assert (reasoning, text) == ("", raw) and splitter.reasoning is None
    assert splitter.tool_calls == [] and splitter.tool_call_error
    assert sent[-1] == ("", raw)  # held back until the output ended


@given(cut_lists)
def test_text_that_only_looks_like_a_marker_start_streams(cuts):
    splitter = OutputSplitter(THINK, tool_format=HERMES)
    assert run(splitter, "1 < 2 and <tool is not <tool_call", cuts)[:2] == ("", "1 < 2 and <tool is not <tool_call")
    assert splitter.tool_calls == [] and splitter.tool_call_error is None  # "<tool_call" unfinished: no marker


def test_without_tools_no_text_is_held_or_parsed():
    template = get_template("qwen3")
    splitter = OutputSplitter.for_prompt(template, template.render([{"role": "user", "content": "hi"}]), tools=False)
    _, text, sent = run(splitter, f"<tool_call>\n{CALL}\n</tool_call>", [3, 9])
    assert text == f"<tool_call>\n{CALL}\n</tool_call>" and sent[0] == ("", "<tool_call>"[:3])
    assert splitter.tool_calls == [] and splitter.tool_call_error is None


@given(cut_lists)
def test_llama3_json_answer_is_a_call_only_from_the_start(cuts):
    splitter = OutputSplitter(None, tool_format=LLAMA3)
    assert run(splitter, ' <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', cuts)[1] == ""
    assert splitter.tool_calls == [PARSED]
    splitter = OutputSplitter(None, tool_format=LLAMA3)
    assert run(splitter, 'Use {"name": "x"} like this.', cuts)[1] == 'Use {"name": "x"} like this.'
    assert splitter.tool_calls == [] and splitter.tool_call_error is None
    splitter = OutputSplitter(None, tool_format=LLAMA3)
    assert run(splitter, '<|python_tag|>print(1)', cuts)[1] == "<|python_tag|>print(1)"  # not JSON: an answer
    assert splitter.tool_calls == [] and splitter.tool_call_error is None


@given(cut_lists)
def test_phi4_calls(cuts):
    splitter = OutputSplitter(None, tool_format=PHI4)
    assert run(splitter, f"Sure.<|tool_call|>[{CALL}, {CALL}]<|/tool_call|>", cuts)[1] == "Sure."
    assert splitter.tool_calls == [PARSED, PARSED]


def test_deepseek_prompt_opens_the_block_and_stop_ends_inside_it():
    template = get_template("deepseek-r1-distill-qwen")
    prompt = template.render([{"role": "user", "content": "2+2?"}])
    splitter = OutputSplitter.for_prompt(template, prompt, tools=False)
    assert run(splitter, "Two and two.\nSo: four.\n</think>\n\n4", [5, 17], stops=("So:",))[:2] == ("Two and two.\n", "")
    assert splitter.reasoning == "Two and two.\n"


@given(cut_lists)
def test_a_stop_string_in_the_answer_after_reasoning(cuts):
    splitter = OutputSplitter(THINK)
    reasoning, text, _ = run(splitter, "<think>\nA stop word: END? No.\n</think>\n\nIt is 4. END of answer", cuts, stops=("END ",))
    assert (reasoning, text) == ("A stop word: END? No.\n", "It is 4. ")


def test_an_output_cut_inside_its_reasoning_has_no_answer():
    splitter = OutputSplitter(THINK)
    assert run(splitter, "<think>\nStill thinking </thi")[:2] == ("Still thinking </thi", "")
    assert splitter.reasoning == "Still thinking </thi"


def test_reasoning_is_none_without_a_block_and_empty_for_an_empty_one():
    for raw, expected in (("Hello.", None), ("<think>\n\n</think>\n\nHello.", ""), ("<think></think>Hello.", "")):
        splitter = OutputSplitter(THINK)
        run(splitter, raw)
        assert splitter.reasoning == expected, raw


def test_qwen3_thinking_off_closes_the_block_in_the_prompt():
    template = get_template("qwen3")
    prompt = template.render([{"role": "user", "content": "hi"}], variables={"enable_thinking": False})
    assert prompt.endswith("<think>\n\n</think>\n\n")
    splitter = OutputSplitter.for_prompt(template, prompt, tools=True)
    assert run(splitter, "Hello!")[:2] == ("", "Hello!") and splitter.reasoning is None


def test_wire_calls_have_unique_ids_and_json_string_arguments():
    ids = itertools.count()
    first = wire_tool_calls([PARSED, PARSED], ids)
    second = wire_tool_calls([PARSED], ids)
    assert [c["id"] for c in first + second] == ["call_0", "call_1", "call_2"]
    assert first[0] == {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert json.loads(wire_tool_calls([{"type": "function", "function": {"name": "f", "arguments": {"q": "été"}}}], ids)[0]["function"]["arguments"]) == {"q": "été"}


@pytest.mark.parametrize("fmt", [HERMES, PHI4, LLAMA3])
def test_plain_answers_pass_unchanged_whatever_the_format(fmt):
    splitter = OutputSplitter(THINK, tool_format=fmt)
    text = "The capital of France is Paris.\n"
    assert run(splitter, text, list(range(0, 40, 3)))[:2] == ("", text)
