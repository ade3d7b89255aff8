"""Ollama's API through rkllmd-http, called with the official `ollama` client against the real daemon."""

from __future__ import annotations

import json
import urllib.request

import ollama
import pytest

from conftest import reference_cases

CASES = reference_cases()
CAPITAL = next(c for c in CASES if c["messages"][-1]["content"] == "What is the capital of France?")
TERSE = next(c for c in CASES if c["messages"][0]["role"] == "system")
NAME = "smollm2-135m-instruct:latest"


@pytest.fixture
def client(gateway):
    return ollama.Client(host=gateway.url, timeout=300)


def test_tags_ps_show_and_version_describe_the_daemons_model(client, gateway) -> None:
    tags = client.list().models
    assert [m.model for m in tags] == [NAME]
    assert tags[0].size > 1_000_000 and len(tags[0].digest) == 64
    assert tags[0].details.family == "llama" and tags[0].details.parameter_size == "135M" and tags[0].details.format == "gguf"
    running = client.ps().models
    assert [m.model for m in running] == [NAME]
    shown = client.show(NAME)
    assert shown.modelinfo["llama.context_length"] == 4096 and shown.modelinfo["general.parameter_count"] == 134515008
    assert shown.capabilities == ["completion", "embedding"]  # SmolLM2's template renders neither tools nor thinking; any model embeds
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3:8b")
    assert missing.value.status_code == 404
    with urllib.request.urlopen(gateway.url + "/api/version", timeout=30) as response:
        assert json.loads(response.read())["version"].count(".") == 2


def test_chat_reproduces_the_greedy_reference_whole_and_streamed(client) -> None:
    case = CAPITAL
    options = {"temperature": 0, "num_predict": case["max_tokens"]}
    whole = client.chat(model=NAME, messages=case["messages"], options=options, stream=False)
    assert whole.message.content == case["completion"] and whole.message.role == "assistant"
    assert whole.done and whole.done_reason == "stop"
    assert whole.prompt_eval_count == case["prompt_tokens"] and whole.eval_count == len(case["completion_ids"])
    assert whole.total_duration >= whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    parts = list(client.chat(model=NAME, messages=case["messages"], options=options, stream=True))
    assert "".join(p.message.content for p in parts) == case["completion"]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == len(case["completion_ids"])


def test_generate_with_system_and_length_limit(client) -> None:
    case = TERSE
    system, user = (m["content"] for m in case["messages"])
    whole = client.generate(model=NAME, prompt=user, system=system, options={"temperature": 0, "num_predict": case["max_tokens"]})
    assert whole.response == case["completion"] and whole.done_reason == "length"
    assert whole.prompt_eval_count == case["prompt_tokens"]
    parts = list(client.generate(model=NAME, prompt=user, system=system, options={"temperature": 0, "num_predict": 5}, stream=True))
    assert case["completion"].startswith("".join(p.response for p in parts)) and parts[-1].eval_count == 5


def test_options_map_onto_the_daemons_sampling(client) -> None:
    options = {"temperature": 1.2, "top_k": 20, "top_p": 0.8, "repeat_penalty": 1.1, "seed": 42, "num_predict": 6, "num_ctx": 2048}
    first = client.chat(model=NAME, messages=[{"role": "user", "content": "Name an animal."}], options=options)
    again = client.chat(model=NAME, messages=[{"role": "user", "content": "Name an animal."}], options=options)
    assert first.message.content == again.message.content and first.eval_count <= 6
    stopped = client.chat(model=NAME, messages=CAPITAL["messages"], options={"temperature": 0, "stop": [" France"]})
    assert stopped.message.content == "The capital of"


def test_errors_come_as_ollama_errors(client) -> None:
    with pytest.raises(ollama.ResponseError) as overflow:
        client.chat(model=NAME, messages=[{"role": "user", "content": "word " * 5000}], options={"num_predict": 2})
    assert overflow.value.status_code == 400 and "context" in overflow.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model=NAME, messages=[{"role": "user", "content": "hi"}], options={"temperature": "hot"})
    assert bad.value.status_code == 400 and "temperature" in bad.value.error
    with pytest.raises(ollama.ResponseError) as streamed:  # refused before the stream starts: a status, not a line
        list(client.chat(model=NAME, messages=[{"role": "user", "content": "hi"}], options={"top_p": 3}, stream=True))
    assert streamed.value.status_code == 400


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_and_thinking_the_model_lacks_are_refused_in_ollamas_words(client) -> None:
    """Ollama's server/routes.go: 400, "<model> does not support tools" (its full name) and
    "\"<model>\" does not support thinking" (the request's, quoted); think false is no request."""
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    for model in (NAME, "smollm2-135m-instruct"):
        with pytest.raises(ollama.ResponseError) as tools:
            client.chat(model=model, messages=messages, tools=[WEATHER], options={"num_predict": 1})
        assert (tools.value.status_code, tools.value.error) == (400, f"{NAME} does not support tools")
        with pytest.raises(ollama.ResponseError) as thinking:
            client.chat(model=model, messages=messages, think=True, options={"num_predict": 1}, stream=True).__next__()
        assert (thinking.value.status_code, thinking.value.error) == (400, f'"{model}" does not support thinking')
        with pytest.raises(ollama.ResponseError) as generating:
            client.generate(model=model, prompt="Hi", think=True, options={"num_predict": 1})
        assert (generating.value.status_code, generating.value.error) == (400, f'"{model}" does not support thinking')
    assert client.chat(model=NAME, messages=messages, think=False, options={"num_predict": 1}).done_reason == "length"


def test_loading_a_model_with_an_empty_request_answers_at_once(client) -> None:
    loaded = client.generate(model=NAME, prompt="")
    assert loaded.done and loaded.done_reason == "load"
