"""Constrained output and logprobs end to end on the CPU backend (protocol 1.4): the real daemon,
the real model, the real client and command line.

What must hold: every answer validates against its schema (jsonschema, the reference
validator) at temperature 1.0 whatever the seed; streams decoded together keep their own
constraints and are each what they are alone; a schema the unconstrained greedy answer
already satisfies changes nothing; a cut by ``max_tokens`` says "length"; what the engine
refuses is an ``invalid_field`` naming the field, and the daemon goes on serving.
"""

from __future__ import annotations

import json
import math
import threading

import jsonschema
import pytest

from conftest import DaemonProcess, rkllmctl
from rkllmctl import DaemonError

# SmolLM2 answers this with valid JSON unconstrained (greedy), in 17 tokens.
ALICE = "Give me a JSON object with keys name and age for a person named Alice who is 30. Output only JSON."
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}
# At temperature 1.0 a 135M model may write digits or letters until max_tokens: bounds keep
# the documents short (and are what a schema for a person would say anyway).
BOUNDED_PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                  "required": ["name", "age"], "additionalProperties": False}
BOB = 'Extract the person as JSON with "name" and "age": Bob is 25 years old.'
TOY = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
}, "required": ["color", "count", "tags"], "additionalProperties": False}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}, "why": {"type": "string", "maxLength": 20}}, "required": ["ok", "why"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Time in a time zone", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def qwen() -> DaemonProcess:
    """SmolLM2 through Qwen 2.5's template, which has tools (Hermes-style calls): SmolLM2's own
    has none, and refuses tools (docs/templates.md, capabilities)."""
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": "qwen2.5-instruct"}).start()
    yield proc
    proc.cleanup()


def generate(daemon, **fields):
    with daemon.client() as client:
        return client.generate(**fields).wait()


def test_the_greedy_answer_that_satisfies_the_schema_is_unchanged(daemon) -> None:
    free = generate(daemon, prompt=ALICE, max_tokens=40, logprobs=True)
    jsonschema.validate(json.loads(free.text), PERSON)  # the case: valid unconstrained
    constrained = generate(daemon, prompt=ALICE, max_tokens=40, logprobs=True, format=PERSON)
    assert constrained.text == free.text and constrained.finish_reason == free.finish_reason == "stop"
    # The same tokens, not only the same text: the mask removed nothing the model chose.
    assert [e["bytes"] for e in constrained.logprobs] == [e["bytes"] for e in free.logprobs]
    assert constrained.stats["completion_tokens"] == free.stats["completion_tokens"]


def test_streams_decoded_together_keep_their_constraints_and_are_what_they_are_alone(daemon) -> None:
    """Four seeded streams at temperature 1.0, each with another schema (one free), batched:
    each output equals the same request alone, and each constrained one validates."""
    requests = [
        {"prompt": "Describe a toy as JSON.", "format": TOY, "seed": 11},
        {"prompt": "Is the sea salty? Answer as JSON.", "format": FLAG, "seed": 12},
        {"prompt": "A cat, as a JSON object.", "format": "json", "seed": 13},
        {"prompt": "Name a fruit.", "seed": 14},
    ]
    common = {"temperature": 1.0, "max_tokens": 60, "no_cache": True}
    alone = [generate(daemon, **r, **common) for r in requests]
    together: list = [None] * len(requests)
    with daemon.client() as observer:
        seen_batched = threading.Event()

        def watch() -> None:
            while not all(together) and not seen_batched.is_set():
                if len(observer.status()["requests"]["running"]) >= 3:
                    seen_batched.set()

        def run(i: int) -> None:
            together[i] = generate(daemon, **requests[i], **common)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        watch()
        for t in threads:
            t.join()
    assert seen_batched.is_set(), "the streams never ran together"
    assert [r.text for r in together] == [r.text for r in alone]
    for request, result in zip(requests, together):
        if "format" in request:
            assert result.finish_reason == "stop", result
            jsonschema.validate(json.loads(result.text), {"type": "object"} if request["format"] == "json" else request["format"])


def test_every_answer_at_temperature_one_validates_whatever_the_seed(daemon) -> None:
    """8 seeds of short schemas, four at a time (batched): not one answer outside its schema
    (test_http_structured.py runs more seeds through every client)."""
    results: dict[int, object] = {}

    def run(seed: int) -> None:
        schema = (TOY, FLAG, BOUNDED_PERSON)[seed % 3]
        results[seed] = (schema, generate(daemon, prompt=BOB, format=schema, temperature=1.0, seed=seed, max_tokens=96))

    for group in range(2):
        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(group * 4, group * 4 + 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for seed, (schema, result) in sorted(results.items()):
        assert result.finish_reason == "stop", (seed, result.text)
        jsonschema.validate(json.loads(result.text), schema)


def test_a_cut_by_max_tokens_is_length_not_a_complete_document(daemon) -> None:
    result = generate(daemon, prompt=ALICE, format=PERSON, max_tokens=6)
    assert result.finish_reason == "length" and result.stats["completion_tokens"] == 6
    with pytest.raises(ValueError):
        json.loads(result.text)
    # A document that ends exactly at the limit is complete: "stop", as the constraint knows.
    whole = generate(daemon, prompt=ALICE, format=PERSON, max_tokens=40)
    exact = generate(daemon, prompt=ALICE, format=PERSON, max_tokens=whole.stats["completion_tokens"])
    assert exact.text == whole.text and exact.finish_reason == "stop"


@pytest.mark.parametrize("fields, field, reason", [
    ({"format": {"type": "objekt"}}, "format", "Invalid type: objekt"),
    ({"format": {"type": "string", "pattern": "(?<=a)b"}}, "format", "look-around"),
    ({"format": "yaml"}, "format", "JSON Schema"),
    ({"grammar": "root ::= [0-9"}, "grammar", "GBNF"),
    ({"grammar": 'start: "x" <|not_in_smollm2|>'}, "grammar", "<|not_in_smollm2|>"),  # found against the vocabulary, in the worker
    ({"tools": [WEATHER], "tool_choice": "required"}, "tools", "does not support tools"),  # SmolLM2's template: no tools to force
    ({"format": "json", "grammar": 'start: "a"'}, "grammar", "at most one"),
])
def test_what_the_engine_refuses_is_invalid_field_with_its_reason(daemon, fields, field, reason) -> None:
    with daemon.client() as client:
        with pytest.raises(DaemonError) as refused:
            client.generate("Hi", max_tokens=4, **fields).wait()
        assert refused.value.name == "invalid_field" and refused.value.details["field"] == field
        assert reason in refused.value.message
        assert client.generate("Hi", max_tokens=2).wait().finish_reason in ("stop", "length")  # still serving


def test_a_forced_tool_call_is_parsed_into_tool_calls(qwen) -> None:
    """A forced call is written in the template's own format (Qwen 2.5's Hermes block) and
    parsed from it; its arguments follow the tool's schema."""
    daemon = qwen
    named = generate(daemon, prompt="What is the weather in Oslo?", tools=[WEATHER, CLOCK], max_tokens=60,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.finish_reason == "stop" and named.text == "" and named.tool_call_error is None
    [call] = named.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    for seed in range(3):
        required = generate(daemon, prompt="What time is it in Tokyo?", tools=[WEATHER, CLOCK], tool_choice="required",
                            temperature=1.0, seed=seed, max_tokens=60)
        [call] = required.tool_calls
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    # "none": the tools are not offered, nothing is parsed as a call.
    none = generate(daemon, prompt="What is the weather in Oslo?", tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert none.tool_calls is None
    with daemon.client() as client:
        with pytest.raises(DaemonError) as refused:
            client.generate("Hi", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}).wait()
    assert refused.value.name == "invalid_field" and refused.value.details["field"] == "tool_choice" and "'get_time'" in refused.value.message


def test_grammars_in_gbnf_and_lark(daemon) -> None:
    gbnf = generate(daemon, prompt="Is water wet? Answer yes or no, then why.", grammar='root ::= ("yes" | "no") ", because " [a-z ]{1,30} "."', max_tokens=40)
    assert gbnf.finish_reason == "stop"
    head, _, tail = gbnf.text.partition(", because ")
    assert head in ("yes", "no") and tail.endswith(".") and tail[:-1].replace(" ", "").isalpha()
    lark = generate(daemon, prompt="How much is a coffee?", grammar='start: "Price: " /[0-9]{1,2}\\.[0-9]{2}/ " EUR"', temperature=1.0, seed=3, max_tokens=20)
    assert lark.finish_reason == "stop" and lark.text.startswith("Price: ") and lark.text.endswith(" EUR")
    float(lark.text.removeprefix("Price: ").removesuffix(" EUR"))


def test_logprobs_cover_every_token_of_the_answer(daemon) -> None:
    with daemon.client() as client:
        stream = client.generate("Name a color.", max_tokens=12, logprobs=True, top_logprobs=3)
        pieces = list(stream.pieces())
        result = stream.result
    entries = result.logprobs
    assert [e for p in pieces for e in p.logprobs] == entries
    assert len(entries) == result.stats["completion_tokens"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == result.text
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        top = [t["logprob"] for t in e["top_logprobs"]]
        assert top == sorted(top, reverse=True)
        assert e["top_logprobs"][0]["token"] == e["token"] and e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy: the best
    # Under a constraint, over the allowed tokens only: "yes" or "no" share all the mass.
    yes_no = generate(daemon, prompt="Is fire cold?", grammar='start: "yes" | "no"', max_tokens=4, logprobs=True, top_logprobs=20)
    first = yes_no.logprobs[0]
    assert {t["token"] for t in first["top_logprobs"]} <= {"yes", "no", "y", "n", "ye"}
    assert math.isclose(sum(math.exp(t["logprob"]) for t in first["top_logprobs"]), 1.0, rel_tol=1e-6)


def test_rkllmctl_schema_json_mode_grammar_and_tool_choice(daemon, qwen, tmp_path) -> None:
    schema = tmp_path / "flag.json"
    schema.write_text(json.dumps(FLAG))
    done = rkllmctl("generate", "--schema", str(schema), "--temperature", "1", "--seed", "4", "--json", "--logprobs", "2", "Is snow white?", socket=daemon.socket)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    jsonschema.validate(json.loads(out["text"]), FLAG)
    assert len(out["logprobs"]) == out["stats"]["completion_tokens"] and len(out["logprobs"][0]["top_logprobs"]) == 2
    plain = rkllmctl("generate", "--json-mode", "-q", "--max-tokens", "60", BOB, socket=daemon.socket)
    assert plain.returncode == 0 and json.loads(plain.stdout) == {"name": "Bob", "age": 25}
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "A" | "B"\n')
    picked = rkllmctl("generate", "--grammar", str(grammar), "-q", "A or B?", socket=daemon.socket)
    assert picked.returncode == 0 and picked.stdout.strip() in ("A", "B")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    called = rkllmctl("generate", "--tools", str(tools), "--tool-choice", "get_weather", "--json", "Weather in Rome?", socket=qwen.socket)
    assert called.returncode == 0 and json.loads(called.stdout)["tool_calls"][0]["function"]["name"] == "get_weather"
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    refused = rkllmctl("generate", "--schema", str(bad), "Hi", socket=daemon.socket)
    assert refused.returncode == 1 and "Invalid type: objekt" in refused.stderr and "invalid_field" in refused.stderr
    both = rkllmctl("generate", "--schema", str(schema), "--json-mode", "Hi", socket=daemon.socket)
    assert both.returncode == 2 and "not allowed with" in both.stderr
