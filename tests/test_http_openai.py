"""OpenAI's API through rkllmd-http, called with the official `openai` client against the real daemon."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from conftest import reference_cases

CASES = reference_cases()
CAPITAL = next(c for c in CASES if c["messages"][-1]["content"] == "What is the capital of France?")
TERSE = next(c for c in CASES if c["messages"][0]["role"] == "system")


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def model_id(client) -> str:
    return client.models.list().data[0].id


def test_the_daemons_model_is_listed(client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]
    assert models[0].owned_by == "rkllmd" and models[0].created > 0
    assert client.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("case", [CAPITAL, TERSE], ids=["eos", "length"])
def test_greedy_reference_reproduced(client, case) -> None:
    reply = client.chat.completions.create(model=model_id(client), messages=case["messages"], max_tokens=case["max_tokens"], temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == case["completion"]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if case["stopped_on_eos"] else "length")
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage.prompt_tokens == case["prompt_tokens"]
    assert reply.usage.completion_tokens == len(case["completion_ids"])
    assert reply.usage.total_tokens == case["prompt_tokens"] + len(case["completion_ids"])
    # Earlier tests on this daemon may have left a conversation state: a prefix, never all of it.
    assert 0 <= reply.usage.prompt_tokens_details.cached_tokens < reply.usage.prompt_tokens


def test_greedy_reference_streamed_with_usage(client) -> None:
    case = CAPITAL
    chunks = list(client.chat.completions.create(
        model=model_id(client), messages=case["messages"], max_completion_tokens=case["max_tokens"], temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == case["completion"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == case["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == len(case["completion_ids"])
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_the_wire_is_server_sent_events_as_openai_sends_them(gateway) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "stream": True}
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"
    assert "usage" not in json.loads(events[0][6:])  # only with stream_options.include_usage


def test_sampling_fields_are_mapped(client) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=6)
    again = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=6)
    assert first.choices[0].message.content == again.choices[0].message.content  # same seed, same output
    assert first.usage.completion_tokens <= 6
    stopped = client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], temperature=0, max_tokens=48, stop=[" is"])
    assert stopped.choices[0].message.content == "The capital of France"
    assert stopped.choices[0].finish_reason == "stop"


def test_a_system_message_matching_a_text_cache_restores_it(client, daemon) -> None:
    system = TERSE["messages"][0]["content"]
    with daemon.client() as rk:
        rk.cache_put("terse-http", system)
        rk.cache_wait("terse-http")
    try:
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=TERSE["messages"], max_tokens=8, temperature=0)
        assert reply.usage.prompt_tokens_details.cached_tokens > 0
        assert TERSE["completion"].startswith(reply.choices[0].message.content)
        named = client.chat.completions.create(model="smollm2-135m-instruct", messages=TERSE["messages"][1:], max_tokens=8, temperature=0,
                                               extra_body={"rkllm_cache": "terse-http"})
        assert named.usage.prompt_tokens_details.cached_tokens > 0
        assert named.choices[0].message.content == reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="smollm2-135m-instruct", messages=TERSE["messages"][1:], max_tokens=2, extra_body={"rkllm_cache": "no-such-cache"})
        assert missing.value.body["code"] == "not_found"
    finally:
        with daemon.client() as rk:
            rk.cache_rm("terse-http")


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),  # OpenAI's range, -2 to 2
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"temperature": 11}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"),
])
def test_unsupported_or_invalid_fields_are_refused_as_openai_does(client, fields, param) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], **fields)
    error = refused.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert refused.value.status_code == 400


def test_tools_and_reasoning_the_model_lacks_are_unsupported_parameters(client) -> None:
    """SmolLM2's template renders neither: OpenAI's refusal of a parameter a model does not take."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    for fields, param in (({"tools": [tool]}, "tools"), ({"reasoning_effort": "low"}, "reasoning_effort")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=1, **fields)
        error = refused.value.body
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unsupported_parameter", param)
        assert error["message"].startswith(f"SmolLM2-135M-Instruct does not support {'tools' if param == 'tools' else 'thinking'}")
    none = client.chat.completions.create(model="smollm2-135m-instruct", messages=CAPITAL["messages"], max_tokens=1, reasoning_effort="none", tools=[tool], tool_choice="none")
    assert none.choices[0].finish_reason == "length"


def test_errors_have_openais_shape_and_status(client, gateway) -> None:
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=2)
    assert overflow.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[])
    assert empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=30)
    assert bad.value.code == 400 and json.loads(bad.value.read())["error"]["code"] == "invalid_json"
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(gateway.url + "/v1/nothing", timeout=30)
    assert unknown.value.code == 404 and "error" in json.loads(unknown.value.read())


def test_content_parts_and_developer_role_are_read_as_text(client) -> None:
    parts = [{"role": "developer", "content": TERSE["messages"][0]["content"]},
             {"role": "user", "content": [{"type": "text", "text": "Why is the sky "}, {"type": "text", "text": "blue?"}]}]
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=parts, max_tokens=6, temperature=0)
    assert TERSE["completion"].startswith(reply.choices[0].message.content)
    assert reply.usage.prompt_tokens == TERSE["prompt_tokens"]
