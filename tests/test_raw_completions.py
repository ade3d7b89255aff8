"""A prompt sent as it is, no chat template: the daemon's ``raw``, rkllmctl ``--raw``,
OpenAI's legacy ``/v1/completions`` (the official client's ``completions.create``: Open
WebUI's /ollama/v1/completions and LiteLLM's text_completion call it) and Ollama's
``raw: true``; and the rest of the surface clients probe: ``GET /``, ``HEAD /``, an
unknown path, a wrong method.

The greedy reference conversations, rendered with the model's template and sent raw, must
give the reference completions token for token: raw text is tokenized as the template's
rendering is.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import ollama
import openai
import pytest

from conftest import DaemonProcess, reference_cases, rkllmctl
from rkllmctl import DaemonError
from rkllmd.templates import get_template

CASES = reference_cases()
CAPITAL = next(c for c in CASES if c["messages"][-1]["content"] == "What is the capital of France?")
TERSE = next(c for c in CASES if c["messages"][0]["role"] == "system")
TEMPLATE = get_template("smollm2-instruct")  # the bundled GGUF's own template renders the same


def rendered(case: dict) -> str:
    return TEMPLATE.render(case["messages"])


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


# -- the daemon ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [CAPITAL, TERSE], ids=["eos", "length"])
def test_a_raw_prompt_is_the_templates_rendering_token_for_token(daemon: DaemonProcess, case: dict) -> None:
    with daemon.client() as client:
        result = client.generate(rendered(case), raw=True, temperature=0, max_tokens=case["max_tokens"]).wait()
    assert result.text == case["completion"]
    assert result.finish_reason == ("stop" if case["stopped_on_eos"] else "length")
    assert result.stats["prompt_tokens"] == case["prompt_tokens"] and result.stats["completion_tokens"] == len(case["completion_ids"])


def test_a_raw_prompt_continues_text_and_is_not_split(daemon: DaemonProcess) -> None:
    """No template: plain text is continued; a <think> the model writes stays in the text."""
    with daemon.client() as client:
        plain = client.generate("The capital of France is", raw=True, temperature=0, max_tokens=4).wait()
        chat = client.generate("The capital of France is", temperature=0, max_tokens=4).wait()
    assert plain.stats["prompt_tokens"] == 5 and chat.stats["prompt_tokens"] > 20  # the template added its turns
    assert plain.text and plain.reasoning is None and plain.tool_calls is None


@pytest.mark.parametrize("fields, field", [
    ({"system": "Be brief."}, "system"),
    ({"cache": "rules"}, "cache"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"vars": {"date_string": "today"}}, "vars"),
    ({"enable_thinking": False}, "enable_thinking"),
])
def test_raw_refuses_what_needs_the_template(daemon: DaemonProcess, fields: dict, field: str) -> None:
    with daemon.client() as client:
        with pytest.raises(DaemonError) as refused:
            client.generate("Hi", raw=True, max_tokens=1, **fields).wait()
        assert (refused.value.name, refused.value.details) == ("invalid_field", {"field": field})
        assert "cannot go with 'raw'" in refused.value.message
        with pytest.raises(DaemonError) as empty:
            client.generate("", raw=True, max_tokens=1).wait()
        assert empty.value.details == {"field": "prompt"}
        with pytest.raises(DaemonError) as chat:
            client.generate(messages=CAPITAL["messages"], raw=True, max_tokens=1).wait()
        assert chat.value.details == {"field": "messages"}


def test_rkllmctl_raw(daemon: DaemonProcess) -> None:
    run = rkllmctl("generate", "--raw", "--json", "--max-tokens", "48", "-", input=rendered(CAPITAL), socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["text"] == CAPITAL["completion"]
    both = rkllmctl("generate", "--raw", "--messages", "chat.json", socket=daemon.socket)
    assert both.returncode == 2 and "--raw takes PROMPT" in both.stderr


# -- OpenAI's /v1/completions ---------------------------------------------------------------


def test_completions_plain_with_usage(client) -> None:
    case = CAPITAL
    reply = client.completions.create(model="smollm2-135m-instruct", prompt=rendered(case), max_tokens=case["max_tokens"], temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == "smollm2-135m-instruct"
    [choice] = reply.choices
    assert (choice.text, choice.index, choice.finish_reason, choice.logprobs) == (case["completion"], 0, "stop", None)
    assert reply.usage.prompt_tokens == case["prompt_tokens"] and reply.usage.completion_tokens == len(case["completion_ids"])
    assert reply.usage.total_tokens == case["prompt_tokens"] + len(case["completion_ids"])
    listed = client.completions.create(model="smollm2-135m-instruct", prompt=[rendered(TERSE)], max_tokens=5, temperature=0)  # a list of one, as LiteLLM sends
    assert TERSE["completion"].startswith(listed.choices[0].text) and listed.choices[0].finish_reason == "length"


def test_completions_streamed_with_usage_and_echo(client) -> None:
    case = TERSE
    prompt = rendered(case)
    chunks = list(client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=case["max_tokens"], temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == case["completion"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == case["max_tokens"]
    assert all(c.object == "text_completion" for c in chunks) and len({c.id for c in chunks}) == 1
    echoed = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt) and case["completion"].startswith(echoed.choices[0].text[len(prompt):])
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == echoed.choices[0].text


def test_completions_stop_and_sampling(client) -> None:
    stopped = client.completions.create(model="smollm2-135m-instruct", prompt=rendered(CAPITAL), max_tokens=48, temperature=0, stop=" is")
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("The capital of France", "stop")
    first, again = (client.completions.create(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11) for _ in range(2))
    assert first.choices[0].text == again.choices[0].text


@pytest.mark.parametrize("fields, param", [
    ({"suffix": "end"}, "suffix"),
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 21}, "logprobs"),  # alternatives: 0 to 20
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_completions_refuse_what_the_daemon_cannot_do(client, fields: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2, **fields})
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"


# -- Ollama's raw -------------------------------------------------------------------------


def test_ollama_raw_generate(gateway) -> None:
    client = ollama.Client(host=gateway.url, timeout=300)
    case = CAPITAL
    whole = client.generate(model="smollm2-135m-instruct", prompt=rendered(case), raw=True, options={"temperature": 0, "num_predict": 48})
    assert whole.response == case["completion"] and whole.prompt_eval_count == case["prompt_tokens"]
    parts = list(client.generate(model="smollm2-135m-instruct", prompt=rendered(case), raw=True, stream=True, options={"temperature": 0, "num_predict": 48}))
    assert "".join(p.response for p in parts) == case["completion"] and parts[-1].done
    unthinking = client.generate(model="smollm2-135m-instruct", prompt=rendered(case), raw=True, think=False, options={"temperature": 0, "num_predict": 3})
    assert case["completion"].startswith(unthinking.response) and unthinking.eval_count == 3
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="smollm2-135m-instruct", prompt="Hi", raw=True, system="Be brief.")
    assert (refused.value.status_code, refused.value.error) == (400, "raw mode does not support template, system, or context")


# -- what clients probe -----------------------------------------------------------------------


def test_root_answers_as_ollama_does(gateway) -> None:
    """Open WebUI and Ollama's clients check a server with GET / (and HEAD /)."""
    with urllib.request.urlopen(gateway.url + "/", timeout=30) as response:
        assert (response.status, response.read()) == (200, b"Ollama is running")
        assert response.headers["Content-Type"].startswith("text/plain")
    head = urllib.request.Request(gateway.url + "/", method="HEAD")
    with urllib.request.urlopen(head, timeout=30) as response:
        assert response.status == 200 and response.read() == b""


def test_an_unknown_path_or_method_says_what(gateway) -> None:
    for path, dialect in (("/v1/embeddingz", "openai"), ("/api/nothing", "ollama"), ("/nothing", "openai")):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(gateway.url + path, timeout=30)
        body = json.loads(missing.value.read())
        message = body["error"]["message"] if dialect == "openai" else body["error"]
        assert missing.value.code == 404 and message.startswith(f"rkllmd-http does not serve {path} (it serves /, ")
        assert "/v1/completions" in message and "/api/generate" in message
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(gateway.url + "/v1/completions", timeout=30)  # GET
    assert wrong.value.code == 405 and wrong.value.headers["Allow"] == "POST"
    assert json.loads(wrong.value.read())["error"]["message"] == "GET is not served on /v1/completions: it takes POST"
