"""Structured outputs, forced tool calls and logprobs through rkllmd-http, called as users call
them: the official openai and ollama clients, LangChain's ``with_structured_output`` (every
method), and LiteLLM's ``ollama/`` provider, whose tool calls are ``format: "json"`` on
/api/generate. The real daemon runs the real model at temperature 1.0 over many seeds:
every answer is checked by ``jsonschema`` against the schema the client asked for.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, Callable

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from test_constrained import BOB, WEATHER
from test_http_tools_reasoning import qwen_gateway  # noqa: F401  (SmolLM2 through Qwen 2.5's template: it has tools)

SEEDS = range(6)


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


PERSON_SCHEMA = Person.model_json_schema()


def each_seed(call: Callable[[int], Any]) -> list[Any]:
    """``call(seed)`` for every seed, four at a time: the daemon decodes them together."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(call, SEEDS))


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def ollama_client(gateway):
    return ollama.Client(host=gateway.url, timeout=300)


# --- OpenAI ----------------------------------------------------------------------------------
def test_openai_json_schema_at_temperature_one(client) -> None:
    """``parse`` sends ``response_format: json_schema`` (strict) made from the pydantic model."""

    def ask(seed: int) -> Any:
        return client.chat.completions.parse(model="smollm2-135m-instruct", messages=[{"role": "user", "content": BOB}], response_format=Person,
                                             temperature=1.0, seed=seed, max_tokens=80)

    for reply in each_seed(ask):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)


def test_openai_json_object_and_its_logprobs_streamed(client) -> None:
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": BOB}], response_format={"type": "json_object"},
                                           max_tokens=60, logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    assert json.loads(choice.message.content) == {"name": "Bob", "age": 25}
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens and "".join(t.token for t in content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": BOB}], response_format={"type": "json_object"},
                                                 max_tokens=60, logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_openai_forced_tool_calls(qwen_gateway, client) -> None:  # noqa: F811
    """Through a template with tools (SmolLM2's own has none: refused, as Ollama refuses them)."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], tool_choice="required")
    assert "does not support tools" in refused.value.body["message"]
    client = openai.OpenAI(base_url=qwen_gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    named = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the weather in Oslo?"}], tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
    assert named.choices[0].finish_reason == "tool_calls"
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Weather in Lima?"}], tools=[WEATHER],
                                                 tool_choice="required", max_tokens=60, stream=True))
    calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [t.function.name for t in calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], tool_choice="required")
    assert refused.value.body["param"] == "tool_choice"


def test_openai_length_and_refusals(client) -> None:
    cut = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": BOB}], max_tokens=5,
                                         response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}})
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(cut.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == "response_format" and "Invalid type: objekt" in error["message"]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], response_format={"type": "xml"})
    assert unknown.value.body["param"] == "response_format"


# --- Ollama ----------------------------------------------------------------------------------
def test_ollama_format_schema_and_json_at_temperature_one(ollama_client) -> None:
    def ask(seed: int) -> Any:
        return ollama_client.chat(model="smollm2-135m-instruct", messages=[{"role": "user", "content": BOB}], format=PERSON_SCHEMA,
                                  options={"temperature": 1.0, "seed": seed, "num_predict": 80})

    for reply in each_seed(ask):
        assert reply.done_reason == "stop", reply.message.content
        jsonschema.validate(json.loads(reply.message.content), PERSON_SCHEMA)
    plain = ollama_client.generate(model="smollm2-135m-instruct", prompt=BOB, format="json", options={"num_predict": 60}, logprobs=True, top_logprobs=1)
    assert json.loads(plain.response) == {"name": "Bob", "age": 25}
    assert "".join(t.token for t in plain.logprobs) == plain.response and all(len(t.top_logprobs) == 1 for t in plain.logprobs)
    cut = ollama_client.generate(model="smollm2-135m-instruct", prompt=BOB, format=PERSON_SCHEMA, options={"num_predict": 4})
    assert cut.done_reason == "length"
    streamed = list(ollama_client.chat(model="smollm2-135m-instruct", messages=[{"role": "user", "content": BOB}], format="json",
                                       options={"num_predict": 60}, stream=True, logprobs=True))
    assert json.loads("".join(part.message.content for part in streamed)) == {"name": "Bob", "age": 25}
    assert sum(len(part.logprobs or ()) for part in streamed) == streamed[-1].eval_count
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.generate(model="smollm2-135m-instruct", prompt="Hi", format={"type": "objekt"})
    assert refused.value.status_code == 400 and "Invalid type: objekt" in refused.value.error


# --- LangChain -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_openai_with_structured_output(gateway, qwen_gateway, method) -> None:  # noqa: F811
    """json_schema: response_format; function_calling: a tool and a named tool_choice (through a
    template with tools); json_mode: json_object, the schema told only in the prompt (LangChain
    then parses whatever object comes: what the daemon guarantees is an object)."""
    if method == "function_calling":
        gateway = qwen_gateway
    from langchain_openai import ChatOpenAI

    schema = {"type": "object"} if method == "json_mode" else PERSON_SCHEMA

    def ask(seed: int) -> Any:
        llm = ChatOpenAI(base_url=gateway.url + "/v1", api_key="unused", model="smollm2-135m-instruct", temperature=1.0, seed=seed, max_tokens=80, max_retries=0)
        structured = llm.with_structured_output(Person if method != "json_mode" else schema, method=method, include_raw=True)
        return structured.invoke(BOB)

    for result in each_seed(ask):
        assert result["parsing_error"] is None, result["raw"]
        parsed = result["parsed"]
        jsonschema.validate(parsed.model_dump() if isinstance(parsed, BaseModel) else parsed, schema)
        if method == "function_calling":
            assert result["raw"].tool_calls[0]["name"] == "Person"


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_ollama_with_structured_output(gateway, method) -> None:
    from langchain_ollama import ChatOllama

    schema = {"type": "object"} if method == "json_mode" else PERSON_SCHEMA

    def ask(seed: int) -> Any:
        llm = ChatOllama(base_url=gateway.url, model="smollm2-135m-instruct", temperature=1.0, seed=seed, num_predict=80)
        return llm.with_structured_output(Person if method != "json_mode" else schema, method=method).invoke(BOB)

    for parsed in each_seed(ask):
        jsonschema.validate(parsed.model_dump() if isinstance(parsed, BaseModel) else parsed, schema)


# --- LiteLLM ---------------------------------------------------------------------------------
def test_litellm_ollama_tools_get_a_tool_call(gateway) -> None:
    """LiteLLM's ``ollama/`` provider describes the tools in the prompt and asks /api/generate
    for ``format: "json"``, then reads an object with "name" and "arguments" as a call. The
    daemon guarantees the object; at this seed SmolLM2 writes it as a call."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of LiteLLM's price list
    import litellm

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}}, "required": ["city"]}}}]
    reply = litellm.completion(model="ollama/smollm2-135m-instruct", api_base=gateway.url, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                               tools=tools, temperature=0.7, seed=4, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


def test_openai_completions_logprobs(client) -> None:
    """The legacy completions' logprobs: tokens, token_logprobs, top_logprobs as maps, text_offset."""
    reply = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2, echo=True)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == reply.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text.removeprefix("The capital of France is")
    assert lp.text_offset[0] == len("The capital of France is")
    assert all(offset == lp.text_offset[0] + len("".join(lp.tokens[:i])) for i, offset in enumerate(lp.text_offset))
    assert all(len(top) <= 2 and max(top.values()) == value for top, value in zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the best
