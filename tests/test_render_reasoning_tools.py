"""Protocol 1.2 on the real daemon and the real SmolLM2: `render`, templates given tools
and variables, the model's output split into reasoning, answer and tool calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, DaemonProcess, rkllmctl
from rkllmctl import DaemonError
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.templates import get_template, resolve

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# A reasoning template in SmolLM2's own format whose generation prompt opens the block,
# as DeepSeek-R1's does; it strips old reasoning from history, so it names "</think>".
THINKING_TEMPLATE = """\
{%- for message in messages %}
{%- set content = message['content'] %}
{%- if message['role'] == 'assistant' and '</think>' in content %}{% set content = content.split('</think>')[-1] | trim %}{% endif %}
{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}
"""
# The same prompts, from a template with no reasoning markers: the raw output.
RAW_TEMPLATE = THINKING_TEMPLATE.replace("'</think>'", "'</end>'")
# SmolLM2 asked this writes one line, "</think>", then goes on.
GRASS = [
    {"role": "system", "content": "You think inside <think> and </think>, then answer. Example: <think>\nThe sky is blue because of scattering.\n</think>\nBlue."},
    {"role": "user", "content": "What color is grass?"},
]


def call(city: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


# Three worked examples in history: after them SmolLM2 calls the tool itself.
WEATHER_SHOTS = [
    message
    for city, temperature in (("Rome", "18 C"), ("Berlin", "9 C"), ("Madrid", "25 C"))
    for message in (
        {"role": "user", "content": f"Weather in {city}?"},
        call(city),
        {"role": "tool", "content": temperature, "tool_call_id": "call_x"},
        {"role": "assistant", "content": f"It is {temperature} in {city}."},
    )
] + [{"role": "user", "content": "Weather in Oslo?"}]


def template_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def thinking(tmp_path_factory) -> DaemonProcess:
    folder = tmp_path_factory.mktemp("think")
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": str(template_file(folder, "think.jinja", THINKING_TEMPLATE))}).start()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> DaemonProcess:
    """SmolLM2 speaking through Qwen 2.5's template (Hermes-style tool calls)."""
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": "qwen2.5-instruct"}).start()
    yield proc
    proc.cleanup()


# -- render ----------------------------------------------------------------------------


def test_render_is_the_gguf_templates_rendering(daemon: DaemonProcess, tmp_path: Path) -> None:
    gguf = GGUFFile(bundled_model_path())
    try:
        library = resolve("", gguf.metadata, "chatml")
    finally:
        gguf.close()
    assert library.name == "tokenizer.chat_template"
    expected = library.render(CHAT)
    (tmp_path / "chat.json").write_text(json.dumps(CHAT))
    with daemon.client() as client:
        rendered = client.render(CHAT)
        plain = client.render(CHAT, add_generation_prompt=False)
        answer = client.generate(messages=CHAT, max_tokens=1).wait()
    assert rendered["text"] == expected and plain["text"] == library.render(CHAT, add_generation_prompt=False)
    assert rendered["tokens"] == answer.stats["prompt_tokens"]  # what generate prefilled
    run = rkllmctl("render", "--messages", str(tmp_path / "chat.json"), socket=daemon.socket)
    assert run.returncode == 0 and run.stdout == expected, run.stderr
    run = rkllmctl("render", "--json", "--no-generation-prompt", "--messages", str(tmp_path / "chat.json"), socket=daemon.socket)
    assert json.loads(run.stdout) == plain


def test_render_with_a_family_a_file_and_variables(daemon: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "chat.json").write_text(json.dumps(CHAT))
    (tmp_path / "vars.json").write_text(json.dumps({"enable_thinking": False}))
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    qwen3 = get_template("qwen3")
    run = rkllmctl("render", "--template", "qwen3", "--messages", str(tmp_path / "chat.json"), "--vars", str(tmp_path / "vars.json"), "--tools", str(tmp_path / "tools.json"), socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert run.stdout == qwen3.render(CHAT, tools=[WEATHER], variables={"enable_thinking": False})
    assert run.stdout.endswith("<think>\n\n</think>\n\n") and json.dumps(WEATHER) in run.stdout  # the schema reached the prompt

    jinja = template_file(tmp_path, "mine.jinja", "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}")
    run = rkllmctl("render", "--template", str(jinja), "--messages", str(tmp_path / "chat.json"), socket=daemon.socket)
    assert run.stdout == "[system] You are terse.<|im_end|>\n[user] What is the capital of France?<|im_end|>\n"  # the model's eos_token
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ messages[-1].content | upper }}"}))
    assert rkllmctl("render", "--template", str(config), "--messages", str(tmp_path / "chat.json"), socket=daemon.socket).stdout == "WHAT IS THE CAPITAL OF FRANCE?"
    missing = rkllmctl("render", "--template", str(tmp_path / "none.jinja"), "--messages", str(tmp_path / "chat.json"), socket=daemon.socket)
    assert missing.returncode == 2 and "neither a family" in missing.stderr


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"template": "qwen4"}, "template", "neither a family"),
        ({"template": "{% for %}"}, "template", "line 1"),
        ({"template": "gemma-2-it"}, "messages", "System role not supported"),
        ({"template": "{{ raise_exception('no thanks') }}"}, "messages", "no thanks"),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be a map"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "tools[0].function.parameters must be a map"),
        ({"tools": {"name": "f"}}, "tools", "must be an array"),
        ({"vars": {"messages": []}}, "vars", "'messages' is set by the renderer"),
        ({"vars": {"not a name": 1}}, "vars", "not a template variable's name"),
        ({"vars": ["enable_thinking"]}, "vars", "must be a map"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [call("a")["tool_calls"][0]]}]}, "messages", "messages[0].tool_calls is only for assistant messages"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": 7}}]}]}, "messages", "messages[0].tool_calls[0].function.arguments must be a map, or a string"),
        ({"messages": [{"role": "user", "content": "x", "data": b"\x00"}]}, "messages", "messages[0].data must hold what JSON can"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": ""}}]}]}, "messages", "function.name must be a non-empty string"),
        ({"messages": [{"role": "tool", "content": "1", "tool_call_id": 7}]}, "messages", "messages[0].tool_call_id must be a string"),
        ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": ["a"]}]}, "messages", "reasoning_content must be a string"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages", "messages[0].content must be a string"),
    ],
)
def test_bad_fields_are_invalid_field_naming_them(daemon: DaemonProcess, fields: dict, field: str, message: str) -> None:
    request = {"messages": CHAT, **fields}
    with daemon.client() as client:
        for op in ("render", "generate"):
            if op == "generate" and "template" in fields:
                continue
            with pytest.raises(DaemonError) as caught:
                client.call(op, **request) if op == "render" else client.generate(**request, max_tokens=1).wait()
            error = caught.value
            assert (error.name, error.details, message in error.message) == ("invalid_field", {"field": field}, True), (op, error)
        assert client.ping()["pong"]  # still serving


def test_enable_thinking_and_vars_must_agree(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        with pytest.raises(DaemonError) as caught:
            client.generate(messages=CHAT, vars={"enable_thinking": True}, enable_thinking=False, max_tokens=1).wait()
        assert caught.value.name == "invalid_field" and caught.value.details == {"field": "enable_thinking"}
        agreed = client.generate(messages=CHAT, vars={"enable_thinking": False}, enable_thinking=False, max_tokens=1).wait()
        assert agreed.finish_reason == "length"


#: transformers' renderings of messages with keys of their own (tools/make_template_references.py).
MESSAGE_KEYS = json.loads((Path(__file__).parent / "data" / "chat-template-message-keys.json").read_text())


@pytest.mark.parametrize("ref", MESSAGE_KEYS, ids=lambda r: f"{r.get('family', 'template')}-{r['case']}")
def test_a_messages_own_keys_reach_the_template_as_transformers_passes_them(daemon: DaemonProcess, ref: dict) -> None:
    """Sent as a client sends them (``wire_messages``: OpenAI's JSON text for arguments, a
    nil content beside tool calls), rendered as transformers rendered ``messages``."""
    with daemon.client() as client:
        def render() -> dict:
            return client.render(ref["wire_messages"], tools=ref["tools"], vars=ref["kwargs"] or None,
                                 template=ref.get("family") or ref["template"], add_generation_prompt=ref["add_generation_prompt"])

        if "error" in ref:
            with pytest.raises(DaemonError) as caught:
                render()
            assert caught.value.name == "invalid_field" and ref["error"]["message"] in caught.value.message
        else:
            assert render()["text"] == ref["rendered"]


def test_the_message_key_references_cover_what_they_claim() -> None:
    cases = {(r.get("family"), r["case"]) for r in MESSAGE_KEYS if "rendered" in r}
    assert {("phi-4-mini-instruct", "system_tools_key"), ("minicpm3", "assistant_thought_key"), (None, "every_key_reaches_the_template"),
            ("llama-3.1-instruct", "openai_tool_round_trip"), ("qwen3", "openai_tool_round_trip")} <= cases
    assert all(r["transformers"] and (r.get("rendered") or r.get("error")) for r in MESSAGE_KEYS)
    phi = next(r for r in MESSAGE_KEYS if r["case"] == "system_tools_key")
    assert "<|tool|>" + phi["messages"][0]["tools"] + "<|/tool|>" in phi["rendered"]  # Phi-4-mini's documented way
    llama = next(r for r in MESSAGE_KEYS if r.get("family") == "llama-3.1-instruct" and r["case"] == "openai_tool_round_trip")
    assert '"parameters": {"city": "Paris", "unit": "celsius"}' in llama["rendered"]  # a map, not JSON text in a string
    assert isinstance(llama["wire_messages"][2]["tool_calls"][0]["function"]["arguments"], str)


def test_history_with_tool_calls_and_results_renders_as_the_library_does(qwen: DaemonProcess) -> None:
    template = get_template("qwen2.5-instruct")
    expected = template.render(
        [m if m.get("tool_calls") is None else {**m, "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": json.loads(m["tool_calls"][0]["function"]["arguments"])}}]} for m in WEATHER_SHOTS],
        tools=[WEATHER],
    )
    with qwen.client() as client:
        rendered = client.render(WEATHER_SHOTS, tools=[WEATHER])
        generated = client.generate(messages=WEATHER_SHOTS, tools=[WEATHER], max_tokens=1).wait()
    assert rendered["text"] == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in expected  # a map, not a string in a string
    assert "<tool_response>\n18 C\n</tool_response>" in expected and json.dumps(WEATHER) in expected
    assert generated.stats["prompt_tokens"] == rendered["tokens"]


# -- reasoning ---------------------------------------------------------------------------


def test_the_real_models_output_is_split_at_the_markers(thinking: DaemonProcess, tmp_path: Path) -> None:
    """The same prompt through a template with markers and one without: the split output
    is the raw output, its reasoning first, the marker and the whitespace after it gone."""
    raw_daemon = DaemonProcess("--backend", "cpu", env={"RKLLMD_MODEL_CHAT_TEMPLATE": str(template_file(tmp_path, "raw.jinja", RAW_TEMPLATE))}).start()
    try:
        with raw_daemon.client() as client:
            raw = client.generate(messages=GRASS, max_tokens=30).wait()
    finally:
        raw_daemon.cleanup()
    with thinking.client() as client:
        stream = client.generate(messages=GRASS, max_tokens=30)
        pieces = list(stream.pieces())
        split = stream.result
    assert raw.reasoning is None and "</think>" in raw.text
    assert split.reasoning == "".join(p.reasoning for p in pieces) and split.text == "".join(p.text for p in pieces)
    assert split.reasoning and split.text and "<think>" not in split.reasoning + split.text
    head, tail = raw.text.split("</think>", 1)
    assert (split.reasoning, split.text) == (head, tail.lstrip())
    first_answer = next(i for i, p in enumerate(pieces) if p.text)
    assert all(p.reasoning for p in pieces[:first_answer]) and not any(p.reasoning for p in pieces[first_answer + 1:])
    assert split.stats["completion_tokens"] == raw.stats["completion_tokens"] and split.finish_reason == raw.finish_reason


def test_stop_strings_and_max_tokens_act_on_the_raw_output(thinking: DaemonProcess) -> None:
    snow = [GRASS[0], {"role": "user", "content": "What color is snow?"}]
    with thinking.client() as client:
        full = client.generate(messages=GRASS, max_tokens=30).wait()
        stopped_in_reasoning = client.generate(messages=GRASS, max_tokens=30, stop=["</think>"]).wait()
        stopped_early = client.generate(messages=GRASS, max_tokens=30, stop=["type"]).wait()
        snow_full = client.generate(messages=snow, max_tokens=30).wait()
        stopped_in_answer = client.generate(messages=snow, max_tokens=30, stop=["Blue"]).wait()
        cut = client.generate(messages=GRASS, max_tokens=3).wait()
    assert (stopped_in_reasoning.reasoning, stopped_in_reasoning.text, stopped_in_reasoning.finish_reason) == (full.reasoning, "", "stop")
    assert (stopped_early.reasoning, stopped_early.text) == (full.reasoning[: full.reasoning.index("type")], "")
    assert snow_full.text.startswith("Blue") and "Blue" not in snow_full.reasoning  # SmolLM2 answers "Blue."
    assert (stopped_in_answer.reasoning, stopped_in_answer.text, stopped_in_answer.finish_reason) == (snow_full.reasoning, "", "stop")
    assert cut.finish_reason == "length" and cut.text == "" and cut.reasoning and full.reasoning.startswith(cut.reasoning)


def test_no_reasoning_block_is_null(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        result = client.generate(messages=CHAT, max_tokens=8).wait()
    assert result.reasoning is None and result.tool_calls is None and result.tool_call_error is None and result.text


# -- tool calls ----------------------------------------------------------------------------


def test_the_real_model_calls_a_tool(qwen: DaemonProcess) -> None:
    with qwen.client() as client:
        stream = client.generate(messages=WEATHER_SHOTS, tools=[WEATHER], max_tokens=40)
        texts = list(stream)
        called = stream.result
        again = client.generate(messages=WEATHER_SHOTS, tools=[WEATHER], max_tokens=40).wait()
        untooled = client.generate(messages=WEATHER_SHOTS, max_tokens=40).wait()
        truncated = client.generate(messages=WEATHER_SHOTS, tools=[WEATHER], max_tokens=8).wait()
    assert texts == [] and called.text == "" and called.finish_reason == "stop" and called.tool_call_error is None
    [tool_call] = called.tool_calls
    assert tool_call["type"] == "function" and tool_call["id"].startswith("call_")
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert again.tool_calls[0]["id"] != tool_call["id"]  # ids unique while the daemon runs
    # Without tools offered nothing is parsed: the model's call-looking text is its answer.
    assert untooled.tool_calls is None and untooled.text.startswith("<tool_call>\n{")
    # A call cut by max_tokens is malformed: kept as text, flagged, never dropped.
    assert truncated.finish_reason == "length" and truncated.tool_calls is None
    assert truncated.text.startswith("<tool_call>") and truncated.tool_call_error


def test_a_tool_result_goes_back_and_the_model_answers(qwen: DaemonProcess) -> None:
    with qwen.client() as client:
        first = client.generate(messages=WEATHER_SHOTS, tools=[WEATHER], max_tokens=40).wait()
        [tool_call] = first.tool_calls
        history = WEATHER_SHOTS + [
            {"role": "assistant", "content": first.text, "tool_calls": first.tool_calls},
            {"role": "tool", "content": "3 C", "tool_call_id": tool_call["id"], "name": "get_weather"},
        ]
        second = client.generate(messages=history, tools=[WEATHER], max_tokens=20).wait()
        rendered = client.render(history, tools=[WEATHER])["text"]
    assert rendered.endswith('{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n3 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert second.tool_calls is None and second.text


# -- rkllmctl ------------------------------------------------------------------------------


def _chat_file(folder: Path, messages: list) -> str:
    path = folder / "chat.json"
    path.write_text(json.dumps(messages))
    return str(path)


def test_cli_reasoning_goes_to_stderr_without_escapes_when_piped(thinking: DaemonProcess, tmp_path: Path) -> None:
    chat = _chat_file(tmp_path, GRASS)
    with thinking.client() as client:
        expected = client.generate(messages=GRASS, max_tokens=30).wait()
    run = rkllmctl("generate", "--max-tokens", "30", "--messages", chat, socket=thinking.socket)
    assert run.returncode == 0 and run.stdout == expected.text + ("" if expected.text.endswith("\n") else "\n")
    assert run.stderr.startswith(expected.reasoning) and "\x1b" not in run.stdout + run.stderr
    hidden = rkllmctl("generate", "--hide-reasoning", "--max-tokens", "30", "--messages", chat, socket=thinking.socket)
    assert hidden.stdout == run.stdout and expected.reasoning not in hidden.stderr
    as_json = json.loads(rkllmctl("generate", "--json", "--max-tokens", "30", "--messages", chat, socket=thinking.socket).stdout)
    assert (as_json["text"], as_json["reasoning"], as_json["tool_calls"], as_json["tool_call_error"]) == (expected.text, expected.reasoning, None, None)


def test_cli_dims_reasoning_on_a_terminal(thinking: DaemonProcess, tmp_path: Path) -> None:
    chat = _chat_file(tmp_path, GRASS)
    with thinking.client() as client:
        expected = client.generate(messages=GRASS, max_tokens=30).wait()
    leader, follower = os.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rkllmctl", "--socket", str(thinking.socket), "generate", "-q", "--max-tokens", "30", "--messages", chat],
            stdout=follower, stderr=subprocess.PIPE, cwd=ROOT, timeout=120,
        )
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, proc.stderr
    shown = out.decode().replace("\r\n", "\n")
    assert shown == "\x1b[2m" + expected.reasoning + "\x1b[22m" + expected.text + ("" if expected.text.endswith("\n") else "\n")


def test_cli_tools_and_json(qwen: DaemonProcess, tmp_path: Path) -> None:
    chat = _chat_file(tmp_path, WEATHER_SHOTS)
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    run = rkllmctl("generate", "--json", "--tools", str(tmp_path / "tools.json"), "--max-tokens", "40", "--messages", chat, socket=qwen.socket)
    out = json.loads(run.stdout)
    assert out["text"] == "" and out["reasoning"] is None and out["tool_call_error"] is None
    assert [c["function"] for c in out["tool_calls"]] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    human = rkllmctl("generate", "-q", "--tools", str(tmp_path / "tools.json"), "--max-tokens", "40", "--messages", chat, socket=qwen.socket)
    assert human.returncode == 0 and human.stdout.startswith("[tool call call_") and human.stdout.endswith(': get_weather({"city": "Oslo"})]\n')
    bad = rkllmctl("generate", "--tools", str(tmp_path / "chat.json"), "hi", socket=qwen.socket)
    assert bad.returncode == 1 and "tools[0] must be a map" in bad.stderr
    (tmp_path / "vars.json").write_text("[1]")
    bad = rkllmctl("generate", "--vars", str(tmp_path / "vars.json"), "hi", socket=qwen.socket)
    assert bad.returncode == 2 and "expected a JSON object" in bad.stderr


def test_chat_asks_for_tool_results_and_keeps_them_in_history(qwen: DaemonProcess, tmp_path: Path) -> None:
    """chat with tools, from a saved conversation: the model's call is shown, the next
    line is its result, the model answers from it, and the conversation goes on."""
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    chat = _chat_file(tmp_path, WEATHER_SHOTS[:-1])
    run = rkllmctl("chat", "--messages", chat, "--tools", str(tmp_path / "tools.json"), "--max-tokens", "40", "--stats", input="Weather in Oslo?\n3 C\n/exit\n", socket=qwen.socket)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[tool call call_") and 'get_weather({"city": "Oslo"})]\n' in run.stdout
    assert run.stderr.count("finish: stop") == 2  # the call, then the answer from its result
    with qwen.client() as client:
        first = client.generate(messages=WEATHER_SHOTS, tools=[WEATHER], max_tokens=40).wait()
        history = WEATHER_SHOTS + [
            {"role": "assistant", "content": "", "tool_calls": first.tool_calls},
            {"role": "tool", "content": "3 C", "tool_call_id": first.tool_calls[0]["id"], "name": "get_weather"},
        ]
        answer = client.generate(messages=history, tools=[WEATHER], max_tokens=40).wait()
    assert run.stdout.endswith("\n" + answer.text + ("" if answer.text.endswith("\n") else "\n"))  # the chat sent that history


# -- capabilities: what a model's template cannot do is refused, not dropped ------------------


def test_status_lists_each_templates_capabilities(daemon: DaemonProcess, qwen: DaemonProcess, thinking: DaemonProcess) -> None:
    for proc, expected in ((daemon, ["completion", "embedding"]), (qwen, ["completion", "tools", "embedding"]), (thinking, ["completion", "thinking", "embedding"])):
        with proc.client() as client:
            assert client.status()["model"]["capabilities"] == expected
    human = rkllmctl("status", socket=qwen.socket).stdout
    assert "can:      completion, tools, embedding  (template qwen2.5-instruct)" in human


def test_tools_or_thinking_the_template_lacks_are_refused(daemon: DaemonProcess, tmp_path: Path) -> None:
    """SmolLM2's own template renders neither: a request for them is an invalid_field naming
    the capability, not a generation that silently ignores them; think off is no request."""
    with daemon.client() as client:
        for fields, field, capability in (({"tools": [WEATHER]}, "tools", "tools"), ({"enable_thinking": True}, "enable_thinking", "thinking")):
            with pytest.raises(DaemonError) as refused:
                client.generate(messages=CHAT, max_tokens=1, **fields).wait()
            assert refused.value.name == "invalid_field" and refused.value.details == {"field": field, "capability": capability}
            assert refused.value.message.startswith(f"SmolLM2-135M-Instruct does not support {capability}: its chat template (tokenizer.chat_template)")
        assert client.generate(messages=CHAT, max_tokens=1, enable_thinking=False, tools=[]).wait().finish_reason == "length"
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    for flag, capability in ((("--tools", str(tmp_path / "tools.json")), "tools"), (("--think",), "thinking")):
        run = rkllmctl("generate", *flag, "--max-tokens", "1", "hi", socket=daemon.socket)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.startswith(f"rkllmctl: SmolLM2-135M-Instruct does not support {capability}: ") and run.stderr.endswith("(invalid_field, 103)\n"), run.stderr


def test_think_is_accepted_where_the_template_has_it(thinking: DaemonProcess) -> None:
    with thinking.client() as client:
        assert client.generate(messages=GRASS, enable_thinking=True, max_tokens=1).wait().finish_reason == "length"
