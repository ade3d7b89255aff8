"""Tool calls and reasoning through rkllmd-http, with the official clients, on the real model.

The daemon parses them (protocol 1.2); the gateway maps them to each API's own fields:
OpenAI's ``tool_calls`` (finish_reason "tool_calls") and ``reasoning_content``, Ollama's
``tool_calls`` (arguments as a map) and ``thinking``. SmolLM2 calls a tool after three worked
examples in its history, through Qwen 2.5's template (Hermes-style calls), and reasons when a
template opens a ``<think>`` block (see test_render_reasoning_tools.py).
"""

from __future__ import annotations

import json
import urllib.request

import ollama
import openai
import pytest

from conftest import DaemonProcess
from http_gateway import GatewayProcess
from test_render_reasoning_tools import GRASS, THINKING_TEMPLATE, WEATHER, WEATHER_SHOTS, template_file


@pytest.fixture(scope="module")
def qwen_gateway():
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": "qwen2.5-instruct"}).start()
    gateway = GatewayProcess(proc.socket).start()
    yield gateway
    gateway.cleanup()
    proc.cleanup()


@pytest.fixture(scope="module")
def thinking_gateway(tmp_path_factory):
    folder = tmp_path_factory.mktemp("think-http")
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": str(template_file(folder, "think.jinja", THINKING_TEMPLATE))}).start()
    with proc.client() as client:
        expected = client.generate(messages=GRASS, max_tokens=40).wait()
    gateway = GatewayProcess(proc.socket).start()
    yield gateway, expected
    gateway.cleanup()
    proc.cleanup()


@pytest.fixture(scope="module")
def phi_gateway():
    """Phi-4-mini's template, which reads a system message's ``tools`` key, on SmolLM2."""
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": "phi-4-mini-instruct"}).start()
    gateway = GatewayProcess(proc.socket).start()
    yield gateway, proc
    gateway.cleanup()
    proc.cleanup()


def _openai(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _openai_history() -> list[dict]:
    """WEATHER_SHOTS as an OpenAI client sends them: every call has an id its result names."""
    history = []
    for n, message in enumerate(WEATHER_SHOTS):
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [{**call, "id": f"call_{n}"} for call in message["tool_calls"]]}
        elif message["role"] == "tool":
            message = {**message, "tool_call_id": history[-1]["tool_calls"][0]["id"]}
        history.append(message)
    return history


def test_openai_tool_call_plain_and_streamed(qwen_gateway: GatewayProcess) -> None:
    with _openai(qwen_gateway) as client:
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=_openai_history(), tools=[WEATHER], max_tokens=40)
        chunks = list(client.chat.completions.create(model=model, messages=_openai_history(), tools=[WEATHER], max_tokens=40, stream=True))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert not choice.message.content
    streamed = [tc for chunk in chunks if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [("get_weather", {"city": "Oslo"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_openai_tool_result_goes_back(qwen_gateway: GatewayProcess) -> None:
    history = _openai_history()
    with _openai(qwen_gateway) as client:
        model = client.models.list().data[0].id
        call = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=40).choices[0].message.tool_calls[0]
        history += [
            {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "3 C"},
        ]
        answer = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=40).choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "3 C" in answer.message.content


def test_ollama_tool_call(qwen_gateway: GatewayProcess) -> None:
    history = [
        {**m, "content": m["content"] or "", "tool_calls": [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}} for c in m["tool_calls"]]}
        if m.get("tool_calls")
        else {k: v for k, v in m.items() if k != "tool_call_id"}
        for m in WEATHER_SHOTS
    ]
    client = ollama.Client(host=qwen_gateway.url, timeout=300)
    model = client.list().models[0].model
    assert client.show(model).capabilities == ["completion", "tools", "embedding"]  # what Open WebUI and llm-ollama read
    reply = client.chat(model=model, messages=history, tools=[WEATHER], options={"num_predict": 40})
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Oslo"}


def test_reasoning_apart_from_the_answer(thinking_gateway) -> None:
    gateway, expected = thinking_gateway
    assert expected.reasoning and expected.text  # the daemon split it: something to map
    with _openai(gateway) as client:
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=GRASS, max_tokens=40).choices[0].message
        chunks = list(client.chat.completions.create(model=model, messages=GRASS, max_tokens=40, stream=True))
    assert (reply.model_extra["reasoning_content"], reply.content) == (expected.reasoning, expected.text)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == expected.reasoning
    assert "".join(d.content or "" for d in deltas) == expected.text

    client = ollama.Client(host=gateway.url, timeout=300)
    assert client.show(client.list().models[0].model).capabilities == ["completion", "thinking", "embedding"]
    said = client.chat(model=client.list().models[0].model, messages=GRASS, options={"num_predict": 40}).message
    assert (said.thinking, said.content) == (expected.reasoning, expected.text)


def test_a_messages_own_keys_reach_the_template_through_both_apis(phi_gateway) -> None:
    """Phi-4-mini's documented way to give it tools: JSON text in the system message's
    ``tools`` key. The prompt the model got is the one ``render`` shows with the key, and
    longer than without it."""
    gateway, daemon = phi_gateway
    tools = json.dumps([{"name": "get_weather", "description": "Get the current weather for a city.", "parameters": {"city": {"type": "str"}}}])
    chat = [{"role": "system", "content": "You are a helpful assistant with some tools.", "tools": tools},
            {"role": "user", "content": "What is the weather like in Paris today?"}]
    with daemon.client() as client:
        with_key = client.render(chat)
        without = client.render([{k: v for k, v in m.items() if k != "tools"} for m in chat])
    assert f"<|tool|>{tools}<|/tool|>" in with_key["text"] and with_key["tokens"] > without["tokens"]
    with _openai(gateway) as client:
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=chat, max_tokens=1)
    request = urllib.request.Request(gateway.url + "/api/chat", json.dumps({"model": "smollm2-135m-instruct", "messages": chat, "stream": False, "options": {"num_predict": 1}}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        ollama_reply = json.loads(answer.read())
    assert reply.usage.prompt_tokens == ollama_reply["prompt_eval_count"] == with_key["tokens"]


def test_a_forced_call_comes_in_the_templates_format_and_a_schema_follows_the_reasoning(qwen_gateway, thinking_gateway) -> None:
    """Constrained output through these templates (protocol 1.6): Qwen 2.5's forced call is its
    own Hermes `<tool_call>` block, parsed into tool_calls; with a template whose prompt opens
    a reasoning block, the model reasons first and the answer alone follows the schema."""
    with _openai(qwen_gateway) as client:
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40)
    assert reply.choices[0].finish_reason == "tool_calls"
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    gateway, expected = thinking_gateway
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 20}}, "required": ["color"], "additionalProperties": False}
    with _openai(gateway) as client:
        answer = client.chat.completions.create(model="smollm2-135m-instruct", messages=GRASS, max_tokens=60,
                                                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}).choices[0]
    assert answer.finish_reason == "stop"
    assert answer.message.model_extra["reasoning_content"] == expected.reasoning  # the reasoning the model writes free
    assert set(json.loads(answer.message.content)) == {"color"}
