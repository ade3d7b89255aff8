"""The constraint engine's glue (rkllmd/constraints.py) and the sampler's mask, without a daemon:
llguidance sees SmolLM2's vocabulary exactly as our tokenizer has it, every form of request
compiles to what it should accept and refuse, forced tool calls come out in each family's
format and parse back, and the sampler masks after its penalties and before truncation."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.backends.cpu.tokenizer import TOKEN_CONTROL, Tokenizer
from rkllmd.constraints import ConstraintError, Vocabulary, engine_reason, from_request
from rkllmd.sampling import Sampler, SamplingParams
from rkllmd.templates.families import HERMES, LLAMA3, PHI4, THINK
from rkllmd.templates.output import OutputSplitter

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}, "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(bundled_model_path()).metadata)


@pytest.fixture(scope="module")
def vocabulary(tokenizer) -> Vocabulary:
    special = [kind == TOKEN_CONTROL for kind in tokenizer.token_types]
    return Vocabulary.from_tokens(tokenizer.token_bytes, special, tokenizer.end_of_generation_ids, tokenizer.encode)


def walk(vocabulary: Vocabulary, constraint, ids: list[int]) -> tuple[int, bool]:
    """Feed ``ids`` through a fresh guide: how many were allowed, and whether the document
    was then complete."""
    guide = vocabulary.guide(constraint)
    for n, token in enumerate(ids):
        if guide.stopped or not guide.allowed(vocabulary.size)[token]:
            return n, False
        guide.accept(token)
    return len(ids), guide.stopped or bool(guide.allowed(vocabulary.size)[sorted(vocabulary.end_ids)].any())


def accepts(vocabulary: Vocabulary, tokenizer: Tokenizer, constraint, text: str) -> bool:
    ids = tokenizer.encode(text)
    taken, complete = walk(vocabulary, constraint, ids)
    return taken == len(ids) and complete


# --- the vocabulary --------------------------------------------------------------------------
def test_llguidance_sees_every_token_as_our_tokenizer_has_it(vocabulary, tokenizer) -> None:
    llg = vocabulary.tokenizer
    assert llg.vocab_size == tokenizer.vocab_size == vocabulary.size
    assert set(llg.eos_tokens) == set(tokenizer.end_of_generation_ids) == {0, 2}
    for i in range(tokenizer.vocab_size):
        assert llg.decode_bytes([i]) == tokenizer.token_bytes[i], i
        assert llg.is_special_token(i) == (tokenizer.token_types[i] == TOKEN_CONTROL), i


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_our_tokenization_of_any_text_is_what_a_grammar_of_that_text_allows(vocabulary, tokenizer, text) -> None:
    """Token by token, the engine's mask allows what our encoder makes of a text the grammar
    spells out (its bytes agree with ours), and the end only once the text is complete.
    (Texts the vocabulary cannot spell are left out: SmolLM2 has no token for a few bytes,
    such as the UTF-8 lead byte 0xF1, and the engine then allows nothing: the generation
    ends as an error, test_constrained.py.)"""
    ids = tokenizer.encode(text)
    assume(tokenizer.decode(ids) == text)
    constraint = from_request(grammar=f"start: {json.dumps(text)}")
    guide = vocabulary.guide(constraint)
    for token in ids:
        allowed = guide.allowed(vocabulary.size)
        assert allowed[token] and not allowed[sorted(vocabulary.end_ids)].any()
        assert not allowed[[i for i, k in enumerate(tokenizer.token_types) if k == TOKEN_CONTROL]].any()
        guide.accept(token)
    assert guide.stopped


# --- what requests compile to ----------------------------------------------------------------
SCHEMAS = [
    # OpenAI's strict mode: every property required, no others.
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False},
     '{"name": "Ada", "age": 36}', '{"name": "Ada", "age": "36"}'),
    ({"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "v": {"const": 2}}, "required": ["color", "v"]},
     '{"color": "green", "v": 2}', '{"color": "blue", "v": 2}'),
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$", "minLength": 6, "maxLength": 6}}, "required": ["code"]},
     '{"code": "ABC-12"}', '{"code": "AB-123"}'),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}}, "required": ["tags"]},
     '{"tags": ["a", "b"]}', '{"tags": ["a", "b", "c"]}'),
    ({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
      "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]}}, "required": ["a", "b"]},
     '{"a": {"x": 1, "y": 2.5}, "b": null}', '{"a": {"x": 1}, "b": null}'),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}, '{"n": 9}', '{"n": 10}'),
]


@pytest.mark.parametrize("schema, valid, invalid", SCHEMAS, ids=["strict", "enum-const", "pattern-length", "items", "ref-anyof", "range"])
def test_a_schema_accepts_its_documents_and_refuses_others(vocabulary, tokenizer, schema, valid, invalid) -> None:
    jsonschema.validate(json.loads(valid), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(invalid), schema)
    constraint = from_request(format=schema)
    assert constraint.field == "format" and constraint.tool_format is None
    assert accepts(vocabulary, tokenizer, constraint, valid)
    assert not accepts(vocabulary, tokenizer, constraint, invalid)


def test_json_is_any_object_with_bounded_whitespace(vocabulary, tokenizer) -> None:
    constraint = from_request(format="json")
    assert accepts(vocabulary, tokenizer, constraint, '{"a": [1, {"b": null}],\n    "c": "x"}')
    assert not accepts(vocabulary, tokenizer, constraint, "[1, 2]")  # an object, as OpenAI's json_object and Ollama's "json"
    assert accepts(vocabulary, tokenizer, constraint, ' {"a": 1}\n')  # as JSON allows, a little around the document
    assert not accepts(vocabulary, tokenizer, constraint, '{"a": 1}' + " " * 9)  # but not much
    assert not accepts(vocabulary, tokenizer, constraint, '{"a":\n\n 1}')  # one line break at a time
    assert not accepts(vocabulary, tokenizer, constraint, '{"a":' + " " * 41 + "1}")
    # A schema that sets its own layout keeps it.
    compact = from_request(format={"type": "object", "x-guidance": {"whitespace_flexible": False}})
    assert accepts(vocabulary, tokenizer, compact, '{"a":1}') and not accepts(vocabulary, tokenizer, compact, '{"a": 1}')


def test_grammars_in_lark_and_gbnf(vocabulary, tokenizer) -> None:
    gbnf = from_request(grammar='root ::= ("yes" | "no") " because " [a-z]+ "."')
    assert gbnf.field == "grammar"
    assert accepts(vocabulary, tokenizer, gbnf, "yes because rain.")
    assert not accepts(vocabulary, tokenizer, gbnf, "maybe because rain.")
    lark = from_request(grammar='start: "total: " NUM " EUR"\nNUM: /[0-9]+(\\.[0-9]{2})?/')
    assert accepts(vocabulary, tokenizer, lark, "total: 12.50 EUR")
    assert not accepts(vocabulary, tokenizer, lark, "total: 12.5 EUR")
    with_json = from_request(grammar='start: "Answer: " %json {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}')
    assert accepts(vocabulary, tokenizer, with_json, 'Answer: {"ok": true}')


@pytest.mark.parametrize("fmt, text", [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    (PHI4, 'functools[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
])
def test_a_forced_call_is_written_in_the_familys_format_and_parses_back(vocabulary, tokenizer, fmt, text) -> None:
    constraint = from_request(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_weather"}}, tool_format=fmt)
    assert constraint.field == "tool_choice" and constraint.tool_format == fmt
    assert accepts(vocabulary, tokenizer, constraint, text)
    assert not accepts(vocabulary, tokenizer, constraint, text.replace("get_weather", "get_time"))
    assert not accepts(vocabulary, tokenizer, constraint, text.replace('"Oslo"', "7"))
    splitter = OutputSplitter(None, tool_format=constraint.tool_format)
    assert splitter.feed(text) == ("", "")
    assert splitter.finish() == ("", "")
    assert [c["function"]["name"] for c in splitter.tool_calls] == ["get_weather"] and splitter.tool_call_error is None
    jsonschema.validate(splitter.tool_calls[0]["function"]["arguments"], WEATHER["function"]["parameters"])


def test_required_is_a_call_to_any_of_the_tools(vocabulary, tokenizer) -> None:
    constraint = from_request(tools=[WEATHER, CLOCK], tool_choice="required", tool_format=HERMES)
    for call in ('{"name": "get_time", "arguments": {"zone": "UTC"}}', '{"name": "get_weather", "arguments": {"city": "Rome"}}'):
        assert accepts(vocabulary, tokenizer, constraint, f"<tool_call>\n{call}\n</tool_call>")
    assert not accepts(vocabulary, tokenizer, constraint, "It is sunny.")
    assert from_request(tools=[WEATHER], tool_choice="auto") is None and from_request(tools=[WEATHER], tool_choice="none") is None


@pytest.mark.parametrize("opened", [False, True], ids=["optional", "opened-by-the-prompt"])
def test_a_reasoning_block_may_come_before_the_answer(vocabulary, tokenizer, opened) -> None:
    constraint = from_request(format="json", reasoning=THINK, reasoning_opened=opened)
    thought = "Let me see: {not json} </thinking is fine> done.\n</think>\n\n"
    assert accepts(vocabulary, tokenizer, constraint, ("" if opened else "<think>") + thought + '{"a": 1}')
    assert accepts(vocabulary, tokenizer, constraint, '{"a": 1}') is not opened  # an opened block must be closed first


@pytest.mark.parametrize("request_fields, field, reason", [
    ({"format": {"type": "objekt"}}, "format", "Invalid type: objekt"),
    ({"format": {"type": "string", "pattern": "(?=a)b"}}, "format", "look-around"),
    ({"format": {"$ref": "#/$defs/missing"}}, "format", "/$defs/missing"),
    ({"format": {"type": "string", "format": "zipcode"}}, "format", "zipcode"),
    ({"format": "yaml"}, "format", "JSON Schema"),
    ({"grammar": "root ::= [0-9"}, "grammar", "GBNF"),
    ({"grammar": "start: undefined_rule"}, "grammar", 'unknown name: "undefined_rule"'),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "tool-call format"),  # a template without one
    ({"format": "json", "grammar": 'start: "x"'}, "grammar", "at most one"),
])
def test_what_the_engine_refuses_names_the_field_and_the_reason(request_fields, field, reason) -> None:
    with pytest.raises(ConstraintError) as refused:
        from_request(**request_fields)
    assert refused.value.field == field
    assert reason in str(refused.value)
    assert "%llguidance" not in str(refused.value) and "body: %json" not in str(refused.value)  # our wrapping is not shown


def test_a_special_token_the_vocabulary_lacks_is_refused_against_it(vocabulary) -> None:
    constraint = from_request(grammar='start: "x" <|not_a_token|>')  # no vocabulary where requests arrive
    with pytest.raises(ConstraintError) as refused:
        vocabulary.guide(constraint)
    assert refused.value.field == "grammar" and "<|not_a_token|>" in str(refused.value)


def test_engine_reason_drops_the_listing_of_our_grammar_and_the_state_dump() -> None:
    message = 'at 3(7): failed to compile JSON schema: Invalid type: x\n   1 | %llguidance {"no_forcing": true}\n   3 | body: %json\n          ^\n<state>\nlots</state>'
    assert engine_reason(message) == "Invalid type: x"
    assert engine_reason("at 1(8): unknown name\n   1 | start: foo\n          ^", ours=False) == "at 1(8): unknown name\n   1 | start: foo\n          ^"


# --- the sampler's mask ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def letters() -> Vocabulary:
    """A real vocabulary of six one-letter tokens and an end token."""
    texts = [b"a", b"b", b"c", b"d", b"e", b"f", b"<end>"]
    return Vocabulary.from_tokens(texts, [False] * 6 + [True], frozenset({6}), lambda text: [texts.index(c.encode()) for c in text])


def test_greedy_is_the_argmax_of_the_allowed_tokens(letters) -> None:
    logits = np.array([5.0, 1.0, 4.0, 3.0, 0.0, 2.0, 9.0], np.float32)
    free = Sampler(SamplingParams())
    assert free.sample(logits) == 6
    constrained = Sampler(SamplingParams(), guide=letters.guide(from_request(grammar='start: ("c" | "d" | "f") "a"')))
    assert constrained.sample(logits) == 2  # c: the best allowed
    assert constrained.sample(logits) == 0 and constrained.guide.stopped


def test_the_mask_comes_after_the_penalty_and_before_top_k(letters) -> None:
    logits = np.array([5.0, 1.0, 4.0, 3.0, 0.0, 2.0, 9.0], np.float32)
    penalized = Sampler(SamplingParams(repeat_penalty=4.0), guide=letters.guide(from_request(grammar='start: "a" | "c"')))
    assert penalized.sample(logits, recent_tokens=[2]) == 0  # c (4.0 / 4 = 1.0) falls below a (5.0)
    penalized = Sampler(SamplingParams(repeat_penalty=4.0), guide=letters.guide(from_request(grammar='start: "a" | "c"')))
    assert penalized.sample(logits, recent_tokens=[0]) == 2
    # top_k 1 over the allowed tokens: a draw can only be the best allowed one (the end token
    # and a, the unconstrained top 2, are not allowed).
    for seed in range(20):
        draw = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=seed), guide=letters.guide(from_request(grammar='start: "b" | "d" | "e"')))
        assert draw.sample(logits) == 3


def test_draws_at_temperature_follow_the_renormalised_allowed_distribution(letters) -> None:
    logits = np.append(np.log(np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], np.float32)), np.float32(-np.inf))  # the end: never
    counts = np.zeros(7)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=5), guide=letters.guide(from_request(grammar="start: /[bcd]+/")))
    for _ in range(3000):
        counts[sampler.sample(logits)] += 1
    assert counts[[0, 4, 5, 6]].sum() == 0
    assert np.allclose(counts[1:4] / counts.sum(), [0.5, 0.25, 0.25], atol=0.03)


def test_logprobs_are_renormalised_over_the_allowed_tokens_at_temperature_one(letters) -> None:
    logits = np.array([5.0, 1.0, 4.0, 3.0, 0.0, 2.0, 9.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=0.3, seed=1, logprobs=5), guide=letters.guide(from_request(grammar='start: "b" | "c" | "d"')))
    token = sampler.sample(logits)
    chosen, top = sampler.logprob
    assert [i for i, _ in top] == [2, 3, 1]  # only the allowed ones, best first
    assert math.isclose(sum(math.exp(v) for _, v in top), 1.0, rel_tol=1e-9)
    assert dict(top)[token] == chosen
    expected = logits[[1, 2, 3]].astype(np.float64)
    assert math.isclose(dict(top)[2], expected[1] - np.log(np.exp(expected).sum()), rel_tol=1e-12)
    free = Sampler(SamplingParams(logprobs=0))
    assert free.sample(logits) == 6 and free.logprob[1] == []
    assert math.isclose(free.logprob[0], 9.0 - np.log(np.exp(logits.astype(np.float64)).sum()), rel_tol=1e-12)
