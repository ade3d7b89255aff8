"""RkllmBackend in process, on the fake runtime of each interface generation.

The fake's behaviour these tests rely on (see tests/fake_rkllm/fake_rkllm.c): one token
is one byte of the templated prompt; the reply is "echo: " + the last user turn,
streamed a word per token, with a multi-byte character split across a WAITING and a
NORMAL callback; FAKE_RKLLM_LOG records every call.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_rkllm.build import ERRORS, RELEASE, foreign_elf, write_model, write_tokenizer

from rkllmd.backends.base import BackendError, ContextOverflow, PrefixState
from rkllmd.backends.rkllm import library as lib_module
from rkllmd.backends.rkllm.backend import RkllmBackend, detect
from rkllmd.backends.rkllm.library import RkllmStartupError
from rkllmd.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
GENERATIONS = ("1.2", "1.3")


# --- helpers -----------------------------------------------------------------------------
@pytest.fixture
def model(tmp_path) -> Path:
    return write_model(tmp_path / "tiny.rkllm")


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The fake's call log: calls() -> [(function, {key: value})] since the last read."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_RKLLM_LOG", str(log))

    def read(*, consume: bool = True) -> list[tuple[str, dict[str, str]]]:
        lines = log.read_text().splitlines() if log.exists() else []
        if consume:
            log.write_text("")
        out = []
        for line in lines:
            name, *pairs = line.split(" ")
            out.append((name, dict(p.split("=", 1) for p in pairs if "=" in p)))
        return out

    return read


@pytest.fixture(params=GENERATIONS)
def generation(request) -> str:
    return request.param


@pytest.fixture
def backend(fake_runtime, generation, model, calls):
    b = RkllmBackend(model, library=fake_runtime[generation])
    b.load()
    calls()  # start each test with an empty log
    yield b
    b.close()


def chat(backend: RkllmBackend, user: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return backend.render(messages)


def run(backend, prompt, params=None, prefix=None, stop_after=None):
    pieces: list[str] = []

    def sink(text: str) -> bool:
        pieces.append(text)
        return stop_after is None or len(pieces) < stop_after

    stats = backend.generate(prompt, params or SamplingParams(), prefix, sink)
    return pieces, stats


def names(log) -> list[str]:
    return [name for name, _ in log]


# --- loading -------------------------------------------------------------------------------
def test_auto_picks_the_generation_from_the_library(fake_runtime, generation, model, calls, caplog):
    caplog.set_level(logging.INFO)
    b = RkllmBackend(model, library=fake_runtime[generation])
    b.load()
    try:
        assert b.describe()["runtime"].startswith(f"{RELEASE[generation]}, interface {generation}")
        assert f"using the {generation} interface" in caplog.text
        assert f"release {RELEASE[generation]} from its marker" in caplog.text
    finally:
        b.close()
    assert names(calls()) == ["rkllm_createDefaultParam", "rkllm_init", "rkllm_set_chat_template", "rkllm_destroy"]


def test_init_values_land_at_their_offsets(fake_runtime, generation, model, calls):
    b = RkllmBackend(model, library=fake_runtime[generation], context_length=1234, max_new_tokens=99, n_keep=7,
                     cpu_mask=0xF0, base_domain_id=3, temperature=0.5, top_k=20, top_p=0.75, repeat_penalty=1.25,
                     frequency_penalty=0.5, presence_penalty=0.25)
    b.load()
    b.close()
    log = dict(calls())
    assert {k: log["rkllm_init"][k] for k in (
        "abi", "model", "max_context_len", "max_new_tokens", "n_keep", "top_k", "top_p", "temperature",
        "repeat_penalty", "frequency_penalty", "presence_penalty", "enabled_cpus_mask", "enabled_cpus_num",
        "base_domain_id", "n_batch", "skip_special_token", "is_async", "use_cross_attn",
    )} == {
        "abi": generation.replace(".", ""), "model": str(model), "max_context_len": "1234", "max_new_tokens": "99",
        "n_keep": "7", "top_k": "20", "top_p": "0.750", "temperature": "0.500", "repeat_penalty": "1.250",
        "frequency_penalty": "0.500", "presence_penalty": "0.250", "enabled_cpus_mask": "0xf0",
        "enabled_cpus_num": "4", "base_domain_id": "3", "n_batch": "1", "skip_special_token": "1", "is_async": "0",
        "use_cross_attn": "0",
    }
    # The daemon renders templates itself: the runtime's is emptied.
    assert log["rkllm_set_chat_template"] == {"system_len": "0", "prefix_len": "0", "postfix_len": "0"}


def test_greedy_is_top_k_1(fake_runtime, model, calls):
    b = RkllmBackend(model, library=fake_runtime["1.2"], temperature=0.0, top_k=40)
    b.load()
    b.close()
    assert dict(calls())["rkllm_init"]["top_k"] == "1"


# --- streaming and stats ----------------------------------------------------------------
def test_streams_exact_text_with_a_split_multibyte_character(backend, calls):
    prompt = chat(backend, "héllo wörld ☃!")
    gc.collect()  # the callbacks must be kept alive by the backend, not by luck
    pieces, stats = run(backend, prompt)
    # "h\xc3" arrives WAITING and is joined with "\xa9llo ".
    assert pieces == ["echo: ", "h", "éllo ", "w", "örld ", "☃!"]
    assert stats.completion_tokens == 7
    assert stats.finish_reason == "stop"
    log = calls()
    assert names(log) == ["rkllm_clear_kv_cache", "rkllm_run", "rkllm_run_end", "rkllm_get_kv_cache_size"]
    assert log[1][1]["keep_history"] == "1" and log[1][1]["kv_before"] == "0"  # cleared, kept for a next turn


def test_finish_stats_become_generation_stats(backend, monkeypatch):
    monkeypatch.setenv("FAKE_RKLLM_PREFILL_US", "100")
    monkeypatch.setenv("FAKE_RKLLM_DECODE_US", "2000")
    prompt = chat(backend, "one two three")
    _, stats = run(backend, prompt)
    assert stats.prompt_tokens == len(prompt.encode())  # the fake's token is a byte
    assert stats.cached_tokens == 0
    assert stats.completion_tokens == 4
    assert stats.prefill_ms >= len(prompt.encode()) * 0.1 * 0.9
    assert stats.decode_ms >= 4 * 2.0 * 0.9
    assert stats.ttft_ms >= stats.prefill_ms


def test_error_state_raises_with_the_runtime_code(backend):
    pieces: list[str] = []
    with pytest.raises(BackendError) as err:
        backend.generate(chat(backend, "first [[fake:error]]"), SamplingParams(), None, pieces.append)
    assert err.value.runtime_code == ERRORS["GENERATION"]
    assert "after an ERROR callback" in str(err.value)
    assert pieces == ["echo: "]
    # The handle is still usable.
    assert "".join(run(backend, chat(backend, "again"))[0]) == "echo: again"


def test_abort_from_another_thread(backend, calls, monkeypatch):
    monkeypatch.setenv("FAKE_RKLLM_DECODE_US", "5000")
    timer = threading.Timer(0.1, backend.abort)
    timer.start()
    started = time.monotonic()
    pieces, stats = run(backend, chat(backend, "on and on [[fake:endless]]"), SamplingParams(max_tokens=1000))
    timer.join()
    assert time.monotonic() - started < 2
    assert stats.finish_reason == "cancelled"
    assert 0 < stats.completion_tokens < 1000
    log = calls()
    assert "rkllm_abort" in names(log)
    # Once the worker resets the abort for its next job, that job runs normally.
    backend.reset_abort()
    assert run(backend, chat(backend, "fresh"))[1].finish_reason == "stop"


def test_sink_false_cancels_and_aborts(backend, calls):
    pieces, stats = run(backend, chat(backend, "a b c d e f"), stop_after=2)
    assert pieces == ["echo: ", "a "]
    assert stats.finish_reason == "cancelled"
    assert stats.completion_tokens == 2
    log = calls()
    assert names(log) == ["rkllm_clear_kv_cache", "rkllm_run", "rkllm_abort", "rkllm_run_end"]
    assert log[-1][1]["reason"] == "pause"


def test_max_tokens_ends_with_length(backend, generation, calls):
    pieces, stats = run(backend, chat(backend, "x [[fake:endless]]"), SamplingParams(max_tokens=5))
    assert stats.completion_tokens == 5
    assert stats.finish_reason == "length"
    assert "".join(pieces) == "echo: x [[fake:endless]] echo: x "
    run_line = dict(calls())["rkllm_run"]
    # 1.3 tells the runtime; 1.2 cannot, and we pause it ourselves.
    assert run_line["limit"] == ("5" if generation == "1.3" else "1024")


def test_runtime_cap_also_ends_with_length(fake_runtime, generation, model):
    b = RkllmBackend(model, library=fake_runtime[generation], max_new_tokens=3)
    b.load()
    try:
        _, stats = run(b, chat(b, "x [[fake:endless]]"), SamplingParams(max_tokens=100))
    finally:
        b.close()
    assert (stats.completion_tokens, stats.finish_reason) == (3, "length")


def test_stop_strings(backend):
    pieces, stats = run(backend, chat(backend, "alpha beta STOP gamma"), SamplingParams(stop=("STOP",)))
    assert "".join(pieces) == "echo: alpha beta "
    assert stats.finish_reason == "stop"
    # A stop string spanning two tokens is never partly emitted.
    pieces, stats = run(backend, chat(backend, "alpha beta STOP gamma"), SamplingParams(stop=("ta ST",)))
    assert "".join(pieces) == "echo: alpha be"
    assert stats.finish_reason == "stop"


def test_per_request_sampling_only_on_1_3(backend, generation, calls):
    run(backend, chat(backend, "hi"), SamplingParams(temperature=0.3, top_k=7, top_p=0.5, repeat_penalty=1.1, frequency_penalty=0.5, presence_penalty=-0.25))
    run_line = dict(calls())["rkllm_run"]
    if generation == "1.3":
        assert run_line["sampling"] == "top_k:7,top_p:0.500,temperature:0.300,repeat_penalty:1.100,frequency_penalty:0.500,presence_penalty:-0.250"
    else:
        assert "sampling" not in run_line  # 1.2 has no such field: the init values apply
        assert backend.describe()["sampling"].startswith("fixed at load")


# --- prompt caches --------------------------------------------------------------------------
def build(backend, tmp_path, system: str, name: str) -> PrefixState:
    text = backend.template.cacheable_prefix(system)
    dest = tmp_path / f"{name}.tmp"
    n = backend.build_prefix(text, dest)
    final = tmp_path / f"{name}.bin"
    dest.rename(final)
    payload, nbytes = backend.load_prefix(final, n)
    assert nbytes == 0
    return PrefixState(name, text, n, payload)


def test_build_prefix_saves_after_one_token(backend, tmp_path, calls):
    text = backend.template.cacheable_prefix("You are terse.")
    n = backend.build_prefix(text, tmp_path / "p.tmp")
    assert n == len(text.encode())  # the runtime's own count of the prefill
    assert (tmp_path / "p.tmp").is_file()
    log = calls()
    assert names(log) == ["rkllm_clear_kv_cache", "rkllm_run", "rkllm_run_end"]
    assert log[1][1]["save_prompt_cache"] == "1" and log[1][1]["path"] == str(tmp_path / "p.tmp")
    assert log[2][1]["tokens"] == "1"


def test_cache_hit_prefills_only_the_tail(backend, tmp_path, calls):
    prefix = build(backend, tmp_path, "You are terse.", "terse")
    prompt = chat(backend, "hi there", system="You are terse.")
    calls()
    pieces, stats = run(backend, prompt, prefix=prefix)
    assert "".join(pieces) == "echo: hi there"  # the full prompt was sent
    log = dict(calls())
    assert log["rkllm_run"]["prompt_len"] == str(len(prompt.encode()))
    assert log["rkllm_run"]["matched"] == str(prefix.n_tokens)
    assert int(log["rkllm_run_end"]["prefill_tokens"]) == len(prompt.encode()) - prefix.n_tokens
    assert stats.cached_tokens == prefix.n_tokens
    assert stats.prompt_tokens == len(prompt.encode())
    # Without the cache, the whole prompt is prefilled.
    run(backend, prompt)
    assert dict(calls())["rkllm_run_end"]["prefill_tokens"] == str(len(prompt.encode()))


def test_cache_load_release_switch_in_order(backend, tmp_path, calls):
    a = build(backend, tmp_path, "System A.", "a")
    b = build(backend, tmp_path, "System B.", "b")
    calls()
    prompt_a, prompt_b = chat(backend, "q", system="System A."), chat(backend, "q", system="System B.")

    def cache_calls():
        return [(n, args.get("path", "")) for n, args in calls()
                if n in ("rkllm_load_prompt_cache", "rkllm_release_prompt_cache", "rkllm_run")]

    run(backend, prompt_a, prefix=a)
    assert cache_calls() == [("rkllm_load_prompt_cache", str(a.payload)), ("rkllm_run", "")]
    run(backend, prompt_a, prefix=a)  # already loaded: no calls
    assert cache_calls() == [("rkllm_run", "")]
    run(backend, prompt_b, prefix=b)  # switch: release first
    assert cache_calls() == [("rkllm_release_prompt_cache", ""), ("rkllm_load_prompt_cache", str(b.payload)),
                             ("rkllm_run", "")]
    run(backend, chat(backend, "q"))  # no prefix: release
    assert cache_calls() == [("rkllm_release_prompt_cache", ""), ("rkllm_run", "")]
    run(backend, chat(backend, "q"))
    assert cache_calls() == [("rkllm_run", "")]
    run(backend, prompt_a, prefix=a)
    build(backend, tmp_path, "System C.", "c")  # building releases the loaded cache first
    assert cache_calls()[:3] == [("rkllm_load_prompt_cache", str(a.payload)), ("rkllm_run", ""),
                                 ("rkllm_release_prompt_cache", "")]


def test_cache_rebuilt_under_the_same_name_is_reloaded(backend, tmp_path, calls):
    a = build(backend, tmp_path, "System A.", "a")
    b = build(backend, tmp_path, "System A.", "b")
    run(backend, chat(backend, "q", system="System A."), prefix=a)
    calls()
    os.replace(b.payload, a.payload)  # a new file at the loaded cache's path
    run(backend, chat(backend, "q", system="System A."), prefix=a)
    assert names(calls())[:2] == ["rkllm_release_prompt_cache", "rkllm_load_prompt_cache"]


def test_a_prefix_the_prompt_does_not_start_with_is_refused(backend, tmp_path):
    a = build(backend, tmp_path, "System A.", "a")
    with pytest.raises(ValueError):
        run(backend, chat(backend, "q", system="Another system."), prefix=a)


def test_foreign_cache_file_fails_with_the_runtime_code(backend, tmp_path):
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"not a prompt cache")
    prefix = PrefixState("bogus", "", 0, bogus)
    with pytest.raises(BackendError) as err:
        run(backend, chat(backend, "q"), prefix=prefix)
    assert err.value.runtime_code == ERRORS["CACHE_FILE"]


# --- facts -----------------------------------------------------------------------------------
def test_identity(backend, generation, model):
    ident = backend.identity()
    assert ident["backend"] == "rkllm" and ident["dtype"] == "rkllm"
    assert ident["runtime"].startswith(f"rkllm {RELEASE[generation]} (interface {generation}, librkllmrt sha256 ")
    assert ident["model"] == str(model)
    assert ident["template"] == backend.template.fingerprint()
    assert ident["context_length"] == 4096
    before = ident["model_fingerprint"]
    write_model(model, "another model\n")
    assert backend.identity()["model_fingerprint"] != before


def test_identity_before_load(fake_runtime, model):
    ident = RkllmBackend(model, library=fake_runtime["1.3"]).identity()
    assert ident["runtime"].startswith("rkllm 1.3.0 (interface 1.3")


def test_token_counts_are_bounded_by_bytes_or_exact_with_the_models_tokenizer(fake_runtime, generation, model, tmp_path):
    bare = RkllmBackend(model, library=fake_runtime[generation], context_length=64)
    exact = RkllmBackend(model, library=fake_runtime[generation], context_length=64, tokenizer=write_tokenizer(tmp_path / "tokenizer.json"))
    bare.load(), exact.load()
    try:
        for text in ("", "abcdef", "é ☃ <|im_start|>user\n"):
            assert exact.count_tokens(text) == len(exact.tokenize(text)) == len(text.encode())  # the fake's are bytes
            assert bare.count_tokens(text) == (len(text.encode()) + 2 if text else 0) and bare.tokenize(text) is None
        # At the edge: 63 tokens and room for one more fit; the bound says 65 and refuses.
        prompt = "x" * 63
        exact.start(prompt, SamplingParams(), None, lambda t: True)
        with pytest.raises(ContextOverflow, match=r"prompt is at most 65 tokens \(counted as UTF-8 bytes \+ 2: set \[rkllm\] tokenizer"):
            bare.start(prompt, SamplingParams(), None, lambda t: True)
        assert exact.describe()["token_counts"].startswith("exact") and bare.describe()["token_counts"].startswith("bounded")
    finally:
        bare.close(), exact.close()


def test_the_bound_holds_where_a_bos_and_a_leading_space_marker_are_both_added(model, tmp_path):
    """Without a tokenizer the count is a bound; Llama 2's tokenizer (TinyLlama's, converted for
    the NPU) adds both a BOS and SentencePiece's leading "▁": "\\n" is [<s>, ▁, <0x0A>] (token
    ids 1, 29871, 13: huggingface/transformers#26273), three tokens for one byte. The same
    shape here, built with ``tokenizers``: a BPE with byte fallback, the "▁" prepended and
    spaces replaced by it, "<s>" added."""
    from tokenizers import Tokenizer, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "a": 260, "▁a": 261}
    llama = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    llama.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert llama.encode("\n").tokens == ["<s>", "▁", "<0x0A>"]
    bare = RkllmBackend(model)  # counting needs no runtime
    for text in ("\n", "a", "\n\n", " \n", "a a", "日", "☃\n", "<|im_start|>user\n"):
        assert bare.count_tokens(text) >= len(llama.encode(text).ids), text


def test_a_tokenizer_that_cannot_be_read_stops_the_start(fake_runtime, model, tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    for path, says in ((tmp_path / "missing.json", "missing.json cannot be loaded"), (tmp_path / "broken.json", "broken.json cannot be loaded")):
        with pytest.raises(RkllmStartupError, match=says):
            RkllmBackend(model, library=fake_runtime["1.2"], tokenizer=path).load()


# --- the context: what the runtime would shift is never sent -----------------------------------
@pytest.fixture
def small(fake_runtime, generation, model, calls, request):
    """A backend whose context holds 200 tokens (the fake's: a prompt byte, or a generated
    word), or what the test's ``context`` mark says."""
    mark = request.node.get_closest_marker("context")
    b = RkllmBackend(model, library=fake_runtime[generation], context_length=mark.args[0] if mark else 200)
    b.load()
    calls()
    yield b
    b.close()


def shifts(log) -> list:
    return [args for name, args in log if name == "rkllm_context_shift"]


def test_a_prompt_that_cannot_fit_is_refused_before_the_runtime_sees_it(small, calls):
    prompt = chat(small, "[[fake:recall]] " + "z" * 180)
    with pytest.raises(ContextOverflow) as caught:
        small.start(prompt, SamplingParams(), None, lambda t: True)
    assert (caught.value.prompt_tokens, caught.value.context_length) == (len(prompt.encode()) + 2, 200)
    with pytest.raises(ContextOverflow):
        small.generate(prompt, SamplingParams(), None, lambda t: True)
    assert "rkllm_run" not in names(calls())


def test_the_answer_ends_where_the_context_does(small, calls):
    prompt = chat(small, "[[fake:endless]] on and on")
    pieces, stats = run(small, prompt, SamplingParams(max_tokens=1000))
    assert stats.finish_reason == "length" and stats.completion_tokens == 200 - small.count_tokens(prompt)
    log = calls()
    assert not shifts(log) and small.kv_cache_size() <= 200


@pytest.mark.context(700)
@pytest.mark.parametrize("end_token", [False, True], ids=["history as counted", "history holding end tokens"])
def test_a_long_conversation_never_overflows_the_runtime(small, calls, monkeypatch, end_token):
    """Turn after turn of one conversation: each continues the runtime's history while the
    history (as long as the runtime says), the new part and a token fit. One that would not is
    not continued: sent whole if that fits (never here: the fake's answers take a token a word
    in its history, a token a byte when sent; tests/test_rkllm_daemon.py's words test resends),
    else refused. The runtime never shifts its
    window: the model sees every turn. A runtime that keeps each answer's end token in its
    history (FAKE_RKLLM_END_TOKEN) has a history longer than its FINISH statistics say: its
    KV size says how long."""
    if end_token:
        monkeypatch.setenv("FAKE_RKLLM_END_TOKEN", "1")
    users = ["[[fake:recall]] a"]
    answers: list[str] = []
    ways = []
    while True:
        prompt = recall_chat(small, users, answers)
        held = small.resumable(prompt)
        try:
            small.start(prompt, SamplingParams(), held, lambda t: True)
        except ContextOverflow:
            break
        pieces, stats = run(small, prompt, prefix=held)
        log = calls()
        assert not shifts(log), (len(users), log)
        answers.append("".join(pieces))
        assert stats.finish_reason == "stop" and answers[-1] == "recall: " + " | ".join(users)
        ways.append("continued" if held is not None else "sent whole")
        assert (names(log)[0] == "rkllm_clear_kv_cache") == (held is None)
        users.append(str(len(users)))
    assert ways[0] == "sent whole" and set(ways[1:]) == {"continued"} and len(ways) > 5, ways
    assert held is None and small._history is not None  # the history was there: it did not fit
    # The last answer's end token is in the runtime's count only (the earlier ones were in the
    # history its prompt continued).
    assert small._history.n_tokens == small.kv_cache_size() == stats.prompt_tokens + stats.completion_tokens + end_token


# --- startup errors ---------------------------------------------------------------------------
def test_library_missing(model, tmp_path):
    with pytest.raises(RkllmStartupError, match="librkllmrt.so not found"):
        RkllmBackend(model, library=tmp_path / "nope" / "librkllmrt.so").load()


def test_default_library_locations_are_searched(model, monkeypatch, tmp_path):
    monkeypatch.setattr(lib_module, "DEFAULT_LIBRARY_PATHS", (tmp_path / "a.so", tmp_path / "b.so"))
    with pytest.raises(RkllmStartupError, match=f"looked at {tmp_path}/a.so, {tmp_path}/b.so"):
        RkllmBackend(model).load()


def test_wrong_architecture(model, tmp_path):
    lib = foreign_elf(tmp_path / "librkllmrt.so")
    host = lib_module.describe_target(lib_module.host_target())
    other = "x86_64" if host == "aarch64" else "aarch64"
    with pytest.raises(RkllmStartupError, match=f"librkllmrt.so is {other} but this machine is {host}"):
        RkllmBackend(model, library=lib).load()


def test_not_a_library(model, tmp_path):
    lib = tmp_path / "librkllmrt.so"
    lib.write_text("#!/bin/sh\n")
    with pytest.raises(RkllmStartupError, match="not an ELF shared library"):
        RkllmBackend(model, library=lib).load()


def test_init_failure_carries_the_code(fake_runtime, generation, tmp_path):
    model = write_model(tmp_path / "broken.rkllm", "FAKE_INIT_FAIL\n")
    with pytest.raises(RkllmStartupError, match="rkllm_init failed with code") as err:
        RkllmBackend(model, library=fake_runtime[generation]).load()
    assert err.value.runtime_code == ERRORS["INIT"]


def test_model_missing(fake_runtime, tmp_path):
    with pytest.raises(RkllmStartupError, match="does not exist"):
        RkllmBackend(tmp_path / "gone.rkllm", library=fake_runtime["1.2"]).load()


def test_no_model_configured(fake_runtime):
    with pytest.raises(RkllmStartupError, match=r"^no \.rkllm model configured \(set \[rkllm\] model\)$"):
        RkllmBackend(None, library=fake_runtime["1.2"]).load()


def test_model_without_the_magic_is_refused_by_the_runtime(fake_runtime, tmp_path, capfd):
    model = tmp_path / "notes.rkllm"
    model.write_text("not a converted model\n")
    with pytest.raises(RkllmStartupError) as err:
        RkllmBackend(model, library=fake_runtime["1.2"]).load()
    assert err.value.runtime_code == ERRORS["MODEL_MAGIC"]
    assert "invalid rknn llm model magic" in capfd.readouterr().err


def test_model_not_rkllm(fake_runtime, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RkllmStartupError, match=r"not an \.rkllm file"):
        RkllmBackend(gguf, library=fake_runtime["1.2"]).load()


def test_forcing_the_other_generation_is_refused(fake_runtime, model):
    with pytest.raises(RkllmStartupError, match="runtime = 1.2 contradicts the library's release 1.3.0"):
        RkllmBackend(model, library=fake_runtime["1.3"], runtime="1.2").load()


def test_forcing_the_wrong_generation_on_a_library_without_marker_fails_loudly(fake_runtime, model, caplog):
    """Nothing in the file can say the force is wrong: the first struct passed must."""
    with pytest.raises(RkllmStartupError) as err:
        RkllmBackend(model, library=fake_runtime["no marker"], runtime="1.3").load()
    assert err.value.runtime_code == ERRORS["CALLBACK"]
    assert "[rkllm] runtime = 1.3 is forced on a library without a release marker" in caplog.text


# --- release detection from the file ------------------------------------------------------------
SUPPORTED = "supported releases: 1.2.1, 1.2.2, 1.2.3, 1.3.0"


@pytest.mark.parametrize("name,runtime,generation,release,says", [
    ("1.2", "auto", "1.2", "1.2.3", "release 1.2.3 from its marker"),
    ("1.3", "auto", "1.3", "1.3.0", "release 1.3.0 from its marker"),
    ("1.3.1", "auto", "1.3", "1.3.1", "release 1.3.1 from its marker, a later patch of the 1.3 line"),
    ("1.4.0", "1.3", "1.3", "1.4.0", "[rkllm] runtime = 1.3, release 1.4.0 from its marker"),
    ("no marker", "1.2", "1.2", None, "[rkllm] runtime = 1.2 (the library has no release marker)"),
])
def test_release_read_from_the_marker(fake_runtime, name, runtime, generation, release, says):
    info = lib_module.inspect_library(fake_runtime[name], runtime)
    assert (info.generation, info.release, info.reason) == (generation, release, says)
    if release:
        assert info.release_text == (
            f"RKLLM SDK (version: {release} | target: Linux | build: 27637c95 2025-05-02 17:46:07)"
        )


@pytest.mark.parametrize("name,runtime,says", [
    ("1.2.1b1", "auto", f"release 1.2.1b1 is a pre-release, whose structs differ from the release's; {SUPPORTED}"),
    ("1.2.1b1", "1.2", "release 1.2.1b1 is a pre-release"),  # known to differ: no force helps
    ("1.2.0", "auto", f"release 1.2.0: its structs and callback differ from 1.2.1's (a pre-release layout); {SUPPORTED}"),
    ("1.4.0", "auto", f"release 1.4.0 is of a line rkllmd has no struct layouts for; {SUPPORTED} "
                      "(set [rkllm] runtime = \"1.2\" or \"1.3\" to force one at your own risk)"),
    ("no marker", "auto", "no release marker (\"RKLLM SDK (version: ...\") in the library; rkllmd does not guess"),
])
def test_release_refused(fake_runtime, name, runtime, says):
    with pytest.raises(RkllmStartupError) as err:
        lib_module.inspect_library(fake_runtime[name], runtime)
    assert str(err.value).startswith(f"{fake_runtime[name]}: {says}")


def test_a_later_patch_runs_with_a_warning(fake_runtime, model, calls, caplog):
    b = RkllmBackend(model, library=fake_runtime["1.3.1"])
    b.load()
    try:
        assert b.describe()["runtime"].startswith("1.3.1, interface 1.3")
    finally:
        b.close()
    assert ("RKLLM runtime 1.3.1 is newer than the releases rkllmd was checked against (1.3.0); "
            "using the 1.3 interface") in caplog.text


def test_decoys_alone_name_no_release(tmp_path):
    """Every version-like text of the real file but the marker: the log format, the NPU runtime's
    own numbering, model-version messages."""
    lib = tmp_path / "librkllmrt.so"
    lib.write_bytes(b"\x7fELF" + bytes(60) + b"\0".join([
        b"I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s",
        b"rknn llm lib version: 2.3.3b0 (c54da5763@2025-04-18T15:37:10)",
        b"librknnrt version: 2.3.3b0", b"RKLLM model version is ", b"rkllm.version", b"1.2.3",
    ]))
    assert lib_module.read_markers(lib) == []


def test_two_releases_in_one_file_are_refused(tmp_path):
    lib = tmp_path / "librkllmrt.so"
    marker = "RKLLM SDK (version: {} | target: Linux | build: 27637c95 2025-05-02 17:46:07)"
    lib.write_bytes(f"\0{marker.format('1.2.3')}\0{marker.format('1.3.0')}\0".encode())
    with pytest.raises(RkllmStartupError, match=r"names several releases \(1.2.3, 1.3.0\)"):
        lib_module.inspect_library(lib)


# --- --backend auto ---------------------------------------------------------------------------------
@pytest.fixture
def board(tmp_path):
    """Empty /dev and /sys roots to populate."""
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    (dev / "dri").mkdir(parents=True)
    sysfs.mkdir()
    return dev, sysfs


def add_render_node(dev: Path, sysfs: Path, name: str, driver: str) -> None:
    (dev / "dri" / name).touch()
    drivers = sysfs / "bus" / "platform" / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    device = sysfs / "class" / "drm" / name / "device"
    device.mkdir(parents=True)
    (device / "driver").symlink_to(drivers)


def test_detect_with_rknpu_render_node(fake_runtime, model, board):
    dev, sysfs = board
    add_render_node(dev, sysfs, "renderD128", "panfrost")
    add_render_node(dev, sysfs, "renderD129", "RKNPU")
    (sysfs / "kernel" / "debug" / "rknpu").mkdir(parents=True)
    (sysfs / "kernel" / "debug" / "rknpu" / "version").write_text("RKNPU driver: v0.9.8\n")
    ok, why = detect(fake_runtime["1.2"], model, dev=dev, sysfs=sysfs)
    assert ok
    assert f"NPU device {dev}/dri/renderD129 (RKNPU driver: v0.9.8)" in why
    assert str(model) in why and str(fake_runtime["1.2"]) in why


def test_detect_with_dev_rknpu(fake_runtime, model, board):
    dev, sysfs = board
    (dev / "rknpu").touch()
    ok, why = detect(fake_runtime["1.3"], model, dev=dev, sysfs=sysfs)
    assert ok and f"{dev}/rknpu" in why and "driver version unreadable" in why


def test_detect_without_npu(fake_runtime, model, board):
    dev, sysfs = board
    add_render_node(dev, sysfs, "renderD128", "panfrost")
    ok, why = detect(fake_runtime["1.2"], model, dev=dev, sysfs=sysfs)
    assert not ok and "no NPU device" in why


@pytest.mark.parametrize("case", ["no library", "wrong arch", "no model", "model missing", "not rkllm"])
def test_detect_refusals(fake_runtime, model, board, tmp_path, case):
    dev, sysfs = board
    (dev / "rknpu").touch()
    library, model_path, expected = fake_runtime["1.2"], model, ""
    if case == "no library":
        library, expected = tmp_path / "none.so", "librkllmrt.so not found"
    elif case == "wrong arch":
        library, expected = foreign_elf(tmp_path / "librkllmrt.so"), "but this machine is"
    elif case == "no model":
        model_path, expected = None, "no .rkllm model configured"
    elif case == "model missing":
        model_path, expected = tmp_path / "gone.rkllm", "does not exist"
    else:
        model_path, expected = tmp_path / "m.gguf", "not an .rkllm file"
        model_path.write_text("x")
    ok, why = detect(library, model_path, dev=dev, sysfs=sysfs)
    assert not ok and expected in why


# --- the board benchmark script ----------------------------------------------------------------------
def test_bench_script_runs_on_the_fake(fake_runtime, generation, model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_RKLLM_PREFILL_US": "20", "FAKE_RKLLM_DECODE_US": "200"}
    env.pop("FAKE_RKLLM_LOG", None)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "npu_board.py"), "--library", str(fake_runtime[generation]),
         "--model", str(model), "--runs", "2", "--max-tokens", "16", "--system-tokens", "250,1000",
         "--conversation-tokens", "250", "--workdir", str(tmp_path / "bench"), "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"interface {generation}" in out.stdout
    tables = [[[c.strip() for c in line.split("|")[1:-1]] for line in block.splitlines() if "---" not in line]
              for block in out.stdout.split("\n\n") if block.startswith("| ")]
    sizes, conversation, embedded = ([dict(zip(t[0], row)) for row in t[1:]] for t in tables)
    # Embeddings: the hidden-layer mode's tokens per second next to a generation's prefill.
    assert [r["text tokens (estimate)"] for r in embedded] == ["128", "512"]
    assert all(float(r["embedding tok/s"]) > 0 and float(r["prefill tok/s (generation)"]) > 0 and r["dimensions"] == "64" for r in embedded)
    assert [(r["system tokens (estimate)"], r["case"]) for r in sizes] == [
        (n, case) for n in ("250", "1000") for case in ("no cache", "prompt cache (first use)", "prompt cache (loaded)")]
    for n in ("250", "1000"):
        cold, _, loaded = (r for r in sizes if r["system tokens (estimate)"] == n)
        assert int(loaded["prefilled tokens"]) < int(cold["prefilled tokens"]) and int(loaded["cached tokens"]) > 0
        assert float(loaded["decode tok/s"]) > 0
    assert [(r["turn"], r["case"]) for r in conversation] == [
        (str(t), case) for case in ("no cache", "prompt cache", "history") for t in range(1, 5)]
    cached = [int(r["prompt tokens"]) for r in conversation if r["case"] == "prompt cache"]
    assert cached == sorted(cached) and len(set(cached)) == 4  # each turn resends a longer conversation
    history = [r for r in conversation if r["case"] == "history"]
    whole = [r for r in conversation if r["case"] == "prompt cache"]
    # Turn 1 starts from the prompt cache; later turns prefill only their new part (the fake's
    # replies are shorter than 16 tokens: each run ends by itself, so its history is trusted).
    assert history[0]["prefilled tokens"] == whole[0]["prefilled tokens"]
    for h, w in zip(history[1:], whole[1:]):
        assert int(h["prefilled tokens"]) < int(w["prefilled tokens"]) and int(h["cached tokens"]) > int(w["cached tokens"])
    assert all(r["same answer as no cache"] == "True" for r in conversation)
    figures = json.loads((tmp_path / "b.json").read_text())
    assert len(figures["prompt_sizes"]) == 6 and len(figures["conversation"]) == 12


# --- the runtime's history (keep_history) --------------------------------------------------
def recall_chat(backend: RkllmBackend, users: list[str], answers: list[str]) -> str:
    messages = []
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return backend.render(messages)


def test_the_fake_shows_a_history_that_was_not_cleared(backend, calls):
    """The negative control of the interleaving tests: runs with keep_history=1 and no
    clear in between see each other's turns; rkllm_clear_kv_cache forgets them."""
    rt = backend._rt
    pieces: list[bytes] = []

    def on_result(state, result):
        if state == 0 and result.text:  # RKLLM_RUN_NORMAL
            pieces.append(result.text)
        return 0

    def recall(user: str) -> str:
        pieces.clear()
        assert rt.run(backend.render([{"role": "user", "content": user}]), on_result, keep_history=True) == 0
        return b"".join(pieces).decode()

    rt.clear_kv_cache()
    assert recall("[[fake:recall]] apples") == "recall: [[fake:recall]] apples"
    assert recall("cars") == "recall: [[fake:recall]] apples | cars"
    rt.clear_kv_cache()
    assert recall("[[fake:recall]] boats") == "recall: [[fake:recall]] boats"


def test_a_continued_conversation_sends_only_its_new_part(backend, calls):
    first = recall_chat(backend, ["[[fake:recall]] apples"], [])
    pieces, stats = run(backend, first)
    answer = "".join(pieces)
    assert answer == "recall: [[fake:recall]] apples" and stats.cached_tokens == 0
    log = calls()
    # After a run the runtime ended itself, its KV size: what the history now holds.
    assert names(log) == ["rkllm_clear_kv_cache", "rkllm_run", "rkllm_run_end", "rkllm_get_kv_cache_size"]
    assert log[1][1]["keep_history"] == "1"
    second = recall_chat(backend, ["[[fake:recall]] apples", "pears"], [answer])
    held = backend.resumable(second)
    # In the runtime's tokens: the fake's prompt tokens are bytes, its generated ones words.
    assert held is not None and held.text == first + answer and held.n_tokens == len(first.encode()) + 3
    pieces, stats = run(backend, second, prefix=held)
    assert "".join(pieces) == "recall: [[fake:recall]] apples | pears"
    log = calls()
    assert names(log) == ["rkllm_run", "rkllm_run_end", "rkllm_get_kv_cache_size"]  # no clear
    new_part = second[len(held.text):].encode()
    # The runtime held exactly what was recorded (the fake's history length is in its tokens).
    assert log[0][1]["prompt_len"] == str(len(new_part)) and log[0][1]["kv_before"] == str(held.n_tokens)
    assert stats.cached_tokens == held.n_tokens and stats.prompt_tokens == held.n_tokens + len(new_part)
    # A prompt that does not continue the history (another conversation) is not offered it.
    assert backend.resumable(recall_chat(backend, ["[[fake:recall]] cars"], [])) is None


@pytest.mark.parametrize("ending", ["stop string", "max_tokens", "cancelled"])
def test_no_history_is_trusted_after_a_run_we_ended(backend, calls, ending):
    params = {"stop string": SamplingParams(stop=("pears",)), "max_tokens": SamplingParams(max_tokens=1)}.get(ending)
    first = recall_chat(backend, ["[[fake:recall]] apples pears plums"], [])
    pieces, _ = run(backend, first, params, stop_after=1 if ending == "cancelled" else None)
    second = recall_chat(backend, ["[[fake:recall]] apples pears plums", "more"], ["".join(pieces)])
    assert backend.resumable(second) is None
    calls()
    run(backend, second)
    assert names(calls())[0] == "rkllm_clear_kv_cache"


def test_a_loaded_prompt_cache_is_matched_only_on_an_empty_history(backend, tmp_path, calls):
    """As #399 upstream reports: no speed-up from a loaded cache when continuing a history."""
    prefix = build(backend, tmp_path, "Be brief.", "brief")
    calls()
    first = chat(backend, "[[fake:recall]] one", system="Be brief.")
    pieces, stats = run(backend, first, prefix=prefix)
    assert stats.cached_tokens == prefix.n_tokens > 0
    log = calls()
    assert [p["matched"] for n, p in log if n == "rkllm_run"] == [str(prefix.n_tokens)]
    second = backend.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "[[fake:recall]] one"},
                             {"role": "assistant", "content": "".join(pieces)}, {"role": "user", "content": "two"}])
    held = backend.resumable(second)
    run(backend, second, prefix=held)
    [(_, run_args)] = [(n, p) for n, p in calls() if n == "rkllm_run"]
    assert run_args["matched"] == "0" and run_args["kv_before"] == str(held.n_tokens)
