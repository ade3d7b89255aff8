"""Chat templates: the shared reference renderings, the template sources, the sandbox's
bounds, and the cacheable prefix of a system message."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.templates import FAMILIES, ChatTemplate, Limits, RenderError, TemplateError, get_template, load, resolve

# ../shared/chat-templates/references.json: transformers' renderings of the real templates.
REFERENCES = json.loads((Path(__file__).parent / "data" / "chat-template-references.json").read_text())

CLOCK = lambda: datetime(2026, 11, 27, 12)  # noqa: E731 (the references' fixed clock)


def test_the_references_are_here():
    assert len(REFERENCES) == 81
    assert {r["family"] for r in REFERENCES} == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_built_in_template_is_the_models_own_text(family):
    shas = {r["template_sha256"] for r in REFERENCES if r["family"] == family}
    assert shas == {hashlib.sha256(FAMILIES[family].text().encode()).hexdigest()}


@pytest.mark.parametrize("ref", REFERENCES, ids=lambda r: f"{r['family']}-{r['case']}-{'gen' if r['add_generation_prompt'] else 'nogen'}")
def test_reference_rendering_reproduced(ref):
    template = ChatTemplate.of_family(ref["family"], clock=CLOCK)
    tokens = {k: v for k, v in ref["kwargs"].items() if k.endswith("_token")}
    variables = {k: v for k, v in ref["kwargs"].items() if not k.endswith("_token")}
    assert dict(template.tokens) == tokens  # the family's own special tokens
    render = lambda: template.render(ref["messages"], ref["add_generation_prompt"], tools=ref["tools"], variables=variables)  # noqa: E731
    if "error" in ref:
        with pytest.raises(RenderError) as caught:
            render()
        assert str(caught.value) == f"chat template {ref['family']}: {ref['error']['message']}"
    else:
        text = render()
        assert text == ref["rendered"]
        assert hashlib.sha256(text.encode()).hexdigest() == ref["rendered_sha256"]


def test_llama_3_2_date_from_the_clock_or_a_variable():
    template = ChatTemplate.of_family("llama-3.2-instruct", clock=lambda: datetime(2027, 1, 5, 8))
    messages = [{"role": "user", "content": "hi"}]
    assert "Today Date: 05 Jan 2027\n" in template.render(messages)
    assert "Today Date: 01 Feb 2025\n" in template.render(messages, variables={"date_string": "01 Feb 2025"})
    assert template.reads_clock and not get_template("qwen3").reads_clock


def test_qwen3_enable_thinking_variable():
    template = get_template("qwen3")
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages, variables={"enable_thinking": False}).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert template.render(messages).endswith("<|im_start|>assistant\n")


def test_none_valued_keys_are_dropped_and_tojson_keeps_unicode():
    template = ChatTemplate.from_text(
        "probe", "{% for m in messages %}{{ m | tojson }}|{{ 'name' in m }}|{{ m | tojson(indent=2) }}{% endfor %}{{ tools is none }}", {}
    )
    out = template.render([{"role": "user", "content": "héllo ✓", "name": None}], add_generation_prompt=False)
    assert out == '{"role": "user", "content": "héllo ✓"}|False|{\n  "role": "user",\n  "content": "héllo ✓"\n}True'


def test_jinja_semantics_trim_lstrip_loopcontrols():
    text = "{% for m in messages %}\n    {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.content }}\n{% endfor %}"
    assert ChatTemplate.from_text("t", text, {}).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\n"


def test_variables_may_not_replace_what_the_renderer_sets():
    with pytest.raises(RenderError, match="'messages' is set by the renderer"):
        get_template("chatml").render([{"role": "user", "content": "x"}], variables={"messages": []})


# -- sources --------------------------------------------------------------------------


def test_template_from_the_gguf_metadata():
    gguf = GGUFFile(bundled_model_path())
    try:
        template = resolve("", gguf.metadata, "chatml")
    finally:
        gguf.close()
    assert template.name == "tokenizer.chat_template"
    assert template.tokens["bos_token"] == "<|im_start|>" and template.tokens["eos_token"] == "<|im_end|>"
    messages = [{"role": "user", "content": "Hi"}]
    # SmolLM2's file holds the same template as the built-in family.
    assert template.render(messages) == get_template("smollm2-instruct").render(messages)
    assert template.render(messages).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_sources_in_order(tmp_path):
    metadata = {"tokenizer.chat_template": "{{ bos_token }}model:{{ messages[0].content }}", "tokenizer.ggml.tokens": ["<a>", "<b>"], "tokenizer.ggml.bos_token_id": 1}
    messages = [{"role": "user", "content": "x"}]
    assert resolve("chatml", metadata, "qwen3").name == "chatml"  # configuration first
    assert resolve("", metadata, "qwen3").render(messages) == "<b>model:x"  # then the model file's
    assert resolve("", {}, "qwen3").name == "qwen3"  # then the family's


def test_template_from_a_jinja_file_takes_the_models_tokens(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", encoding="utf-8")
    template = load(str(path), {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "hé"}]) == "<s>[user] hé\n"
    assert template.name == str(path)


def test_template_from_a_tokenizer_config(tmp_path):
    reference = next(r for r in REFERENCES if r["family"] == "phi-3.5-mini-instruct" and r["case"] == "c_multi_turn")
    path = tmp_path / "tokenizer_config.json"
    path.write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "lstrip": False},
                "eos_token": "<|endoftext|>",
                "chat_template": [{"name": "default", "template": FAMILIES["phi-3.5-mini-instruct"].text()}, {"name": "rag", "template": "x"}],
            }
        )
    )
    template = load(str(path))
    assert dict(template.tokens) == {"bos_token": "<s>", "eos_token": "<|endoftext|>"}
    assert template.render(reference["messages"], reference["add_generation_prompt"]) == reference["rendered"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{}", "has no chat_template"),
        ("[1]", "not an object"),
        ("{", "is not JSON"),
    ],
)
def test_bad_tokenizer_configs(tmp_path, content, message):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=message):
        load(str(path))


def test_unknown_names_and_broken_files(tmp_path):
    with pytest.raises(TemplateError, match="unknown chat template 'llama9'; known: chatml, deepseek-r1-distill-qwen"):
        load("llama9")
    with pytest.raises(TemplateError, match="cannot read chat template file"):
        load(str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("hello\n{% for m in messages %}")
    with pytest.raises(TemplateError, match=r"broken.jinja: line 2: Unexpected end of template"):
        load(str(broken))


# -- a template that refuses, a hostile template ---------------------------------------


def test_a_raising_template_names_its_message():
    with pytest.raises(RenderError, match=r"^chat template gemma-2-it: System role not supported$"):
        get_template("gemma-2-it").render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    template = ChatTemplate.from_text("t", "{{ 1 // 0 }}", {})
    with pytest.raises(RenderError, match="chat template t: ZeroDivisionError"):
        template.render([])


@pytest.mark.parametrize(
    "text",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_hostile_template_cannot_leave_the_sandbox(text):
    with pytest.raises(RenderError) as caught:
        ChatTemplate.from_text("hostile", text, {}).render([{"role": "user", "content": "x"}])
    assert "is refused" in str(caught.value) or "unsafe" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # silent, endless
        "{% set s = 'ab' * 1000 %}{% for c in s %}{% for d in s %}{% for e in s %}{% endfor %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",  # huge output
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ 'x' * 10000000000 }}",
        "{{ (['x' * 1000] * 100000) | join }}",
        "{{ 'x'.center(1000000000) }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ 2 ** 10000000000 }}",
        "{{ range(10**12) | list }}",
        "{% set s = 'a' * 100000 %}{{ s.replace('a', s) }}",
    ],
)
def test_hostile_template_is_bounded_in_time_and_size(text):
    template = ChatTemplate.from_text("hostile", text, {}, limits=Limits(seconds=0.5, chars=1_000_000))
    started = time.monotonic()
    with pytest.raises(RenderError, match="^chat template hostile: (rendering took longer than 0.5 s|made a value longer than 1000000 characters|asked for a size above 1000000|raised a number to too large a power|wrote more than 1000000 characters)$"):
        template.render([])
    assert time.monotonic() - started < 5


def test_a_template_too_large_is_refused():
    with pytest.raises(TemplateError, match="longer than"):
        ChatTemplate.from_text("big", "x" * (2 << 20), {})


# -- the cacheable prefix of a system message -----------------------------------------


SYSTEM = "You answer in one sentence."


def conversations():
    user = {"role": "user", "content": "Where is Paris?"}
    return [
        ([user], True),
        ([user], False),
        ([user, {"role": "assistant", "content": "In France."}, {"role": "user", "content": "And Rome?"}], True),
    ]


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gemma-2-it"}))
def test_cacheable_prefix_starts_every_conversation(family):
    template = ChatTemplate.of_family(family, clock=CLOCK)
    prefix = template.cacheable_prefix(SYSTEM)
    for turns, generation_prompt in conversations():
        assert template.render([{"role": "system", "content": SYSTEM}, *turns], generation_prompt).startswith(prefix)
    if family not in ("gemma-3-it",):
        assert SYSTEM in prefix


def test_cacheable_prefix_drops_phis_end_token():
    for family, ends in (("phi-3.5-mini-instruct", "<|end|>\n"), ("phi-4-mini-instruct", "<|end|>")):
        template = get_template(family)
        alone = template.render([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
        assert alone.endswith("<|endoftext|>")
        prefix = template.cacheable_prefix(SYSTEM)
        assert prefix.endswith(SYSTEM + ends), prefix  # never inside the next marker ("<|")


def test_cacheable_prefix_of_gemma_3_is_the_start_of_text_and_gemma_2_refuses():
    assert get_template("gemma-3-it").cacheable_prefix(SYSTEM) == "<bos>"
    with pytest.raises(RenderError, match="System role not supported"):
        get_template("gemma-2-it").cacheable_prefix(SYSTEM)


def test_cacheable_prefix_of_llama_3_2_holds_the_date():
    day1 = ChatTemplate.of_family("llama-3.2-instruct", clock=lambda: datetime(2026, 11, 27, 23, 59))
    day2 = ChatTemplate.of_family("llama-3.2-instruct", clock=lambda: datetime(2026, 11, 28, 0, 1))
    assert "Today Date: 27 Nov 2026" in day1.cacheable_prefix(SYSTEM)
    assert day1.cacheable_prefix(SYSTEM) != day2.cacheable_prefix(SYSTEM)


def test_fingerprint_follows_text_and_tokens():
    a = get_template("chatml")
    b = ChatTemplate("chatml", a.text, {**a.tokens, "bos_token": "<x>"})
    c = ChatTemplate("chatml", a.text + " ", a.tokens)
    assert a.fingerprint() == ChatTemplate("elsewhere", a.text, a.tokens).fingerprint()
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3


# -- capabilities: what a request may ask of a template, found by rendering it -------------

CAPABILITIES = {
    "qwen2.5-instruct": ("completion", "tools"),
    "qwen3": ("completion", "tools", "thinking"),  # reads enable_thinking
    "deepseek-r1-distill-qwen": ("completion", "thinking"),  # opens <think> in every prompt
    "llama-3.1-instruct": ("completion", "tools"),
    "llama-3.2-instruct": ("completion", "tools"),
    # Phi-4-mini's template writes tools only from a system message's own "tools" key, never
    # from the tools a request gives; MiniCPM3's writes them, but in no call format rkllmd parses.
    "phi-4-mini-instruct": ("completion",),
    "minicpm3": ("completion",),
    "gemma-2-it": ("completion",),
    "gemma-3-it": ("completion",),
    "phi-3.5-mini-instruct": ("completion",),
    "internlm2-chat": ("completion",),
    "smollm2-instruct": ("completion",),
    "chatml": ("completion",),
}


def test_every_family_has_its_capabilities_listed():
    assert set(CAPABILITIES) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capabilities_of_each_family(family):
    assert ChatTemplate.of_family(family).capabilities == CAPABILITIES[family]


def test_capabilities_of_the_bundled_models_own_template():
    """SmolLM2's template (its GGUF's) renders neither tools nor thinking: completion only."""
    metadata = GGUFFile(bundled_model_path()).metadata
    assert resolve("", metadata, "smollm2-instruct").capabilities == ("completion",)


CHATML_LOOP = "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"


@pytest.mark.parametrize("text, expected", [
    # Tools rendered, calls in Hermes' form: tools.
    (CHATML_LOOP + "{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>", ("completion", "tools")),
    # Names <tool_call> (so its calls would parse) but never writes the tools: no tools.
    (CHATML_LOOP + "{# <tool_call> #}", ("completion",)),
    # Writes the tools, in a call format no parser of ours knows: no tools.
    (CHATML_LOOP + "{%- if tools %}TOOLS: {{ tools | tojson }}{% endif %}", ("completion",)),
    # Reads enable_thinking and marks reasoning with </think>: thinking.
    (CHATML_LOOP + "{%- if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is false %}<think></think>{% endif %}{% endif %}", ("completion", "thinking")),
    # Opens the reasoning block in every prompt (and strips it from the history): thinking.
    (CHATML_LOOP.replace("m['content']", "m['content'].split('</think>')[-1]") + "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
     ("completion", "thinking")),
    # Knows </think> only to strip it from the history: no thinking.
    (CHATML_LOOP.replace("m['content']", "m['content'].split('</think>')[-1]"), ("completion",)),
    # Refuses a conversation without a system message: completion only.
    ("{{ raise_exception('a system message first') }}", ("completion",)),
])
def test_capabilities_follow_what_the_template_renders(text, expected):
    assert ChatTemplate.from_text("probe", text, {}).capabilities == expected


def test_capabilities_do_not_depend_on_the_hour():
    """A template writing today's date, rendered either side of midnight, has no tools for it."""
    days = (datetime(2026, 11, 27 + i, 23, 59) for i in range(30))  # each reading of the clock a day later
    template = ChatTemplate.from_text("dated", CHATML_LOOP + "{{ strftime_now('%d %b %Y') }}{# <tool_call> #}", {}, clock=lambda: next(days))
    assert template.tool_calls == "hermes" and template.capabilities == ("completion",)
