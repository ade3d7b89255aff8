"""Conversations reuse their own state: after a generation the CPU backend's state of prompt
plus completion is kept, and a later prompt restores the longest token prefix it shares
with it. In process (logits compared bit for bit) and on the real daemon (outputs compared
with ``no_cache``, what ``done.stats`` and ``status`` say, the memory budget)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DaemonProcess, rkllmctl
from rkllmd.backends.base import CONVERSATION, PrefixState
from rkllmd.backends.cpu.backend import CpuBackend
from rkllmd.backends.cpu.model import KVState
from rkllmd.sampling import SamplingParams

SYSTEM = "You are a patient tutor. Answer in one or two sentences."
QUESTIONS = ["What is a prime number?", "Give me an example.", "Is 1 one of them?", "And 2?"]
ASIDE = ["Name a colour.", "Name another one.", "Which of the two is darker?", "Thanks."]
UNLIMITED = 1 << 40


@pytest.fixture(scope="module")
def backend():
    cpu = CpuBackend(context_length=1024)
    cpu.load()
    yield cpu
    cpu.close()


def generate(cpu: CpuBackend, prompt: str, prefix: PrefixState | None = None, **params):
    """One generation, step by step as the daemon drives it: its text, stats and the state it
    leaves for the next turn (what the daemon keeps before releasing its slot)."""
    pieces: list[str] = []
    run = cpu.start(prompt, SamplingParams(**{"max_tokens": 24, **params}), prefix, lambda p: pieces.append(p) or True)
    while not run.done:
        cpu.step([run])
    kept = cpu.kept_state(run, UNLIMITED)
    cpu.release(run)
    return "".join(pieces), run.stats, kept


def chat(system: str, questions: list[str], answers: list[str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def logits_after_restoring(cpu: CpuBackend, state: PrefixState, ids: list[int], n: int) -> np.ndarray:
    """Restore ``n`` positions from ``state`` into a KV cache filled with garbage, prefill the rest."""
    model = cpu.model
    slot = model.new_slot()
    slot.keys[...] = 7.0
    slot.values[...] = -7.0
    model.restore_state(slot, state.payload, n)
    return model.prefill(slot, ids[n:], n)


# -- in process: the bits ----------------------------------------------------------------


@pytest.mark.parametrize("assistant_edit", ["as generated", "re-rendered differently"])
def test_next_turn_from_the_kept_state_gives_the_logits_of_prefilling_it_all(backend, assistant_edit):
    """The kept state holds prompt and completion as they went through the model (decode
    steps included); the next turn restores the longest common token prefix, never more,
    and its logits are those of prefilling the whole prompt, bit for bit."""
    first = backend.render(chat(SYSTEM, QUESTIONS[:1], []))
    answer, _, state = generate(backend, first)
    assert state is not None and state.kind == CONVERSATION and isinstance(state.payload, KVState)
    first_ids = backend.tokenize(first)
    assert state.n_tokens > len(first_ids) and list(state.tokens[: len(first_ids)]) == first_ids
    if assistant_edit != "as generated":  # a template that drops reasoning, a client that trims
        answer = "Well. " + answer
    ids = backend.tokenize(backend.render(chat(SYSTEM, QUESTIONS[:2], [answer])))
    restored = backend._restorable(state, ids)
    agreed = next(i for i, (a, b) in enumerate(zip(state.tokens, ids)) if a != b) if assistant_edit != "as generated" else state.n_tokens
    assert restored == agreed and restored >= len(first_ids) - 1
    assert list(ids[:restored]) == list(state.tokens[:restored])
    full = backend.model.prefill(backend.model.new_slot(), ids, 0)
    assert np.array_equal(logits_after_restoring(backend, state, ids, restored), full)


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9, "top_k": 20, "seed": 11}], ids=["greedy", "seeded"])
def test_generating_from_a_conversation_state_is_generating_without(backend, params):
    first = backend.render(chat(SYSTEM, QUESTIONS[:1], []))
    answer, _, state = generate(backend, first, **params)
    second = backend.render(chat(SYSTEM, QUESTIONS[:2], [answer]))
    generate(backend, backend.render(chat(SYSTEM, ASIDE[:1], [])))  # the KV cache now holds another chat
    with_state, stats, _ = generate(backend, second, state, **params)
    without, plain, _ = generate(backend, second, None, **params)
    assert with_state == without and stats.prompt_tokens == plain.prompt_tokens
    assert stats.cached_tokens > len(backend.tokenize(first)) and plain.cached_tokens == 0


def test_kept_state_respects_the_budget_and_a_cancelled_prefill_keeps_only_what_is_sound(backend):
    prompt = backend.render(chat(SYSTEM, QUESTIONS[:1], []))
    kv = backend.describe()["kv_bytes_per_token"]
    run = backend.start(prompt, SamplingParams(max_tokens=4), None, lambda p: True)
    while not run.done:
        backend.step([run])
    state = backend.kept_state(run, UNLIMITED)
    assert state.nbytes == state.n_tokens * kv
    assert backend.kept_state(run, state.nbytes - 1) is None
    backend.release(run)
    run = backend.start(prompt, SamplingParams(), None, lambda p: True)
    run.abort()
    backend.step([run])
    assert run.done and run.stats.finish_reason == "cancelled"
    assert backend.kept_state(run, UNLIMITED) is None  # nothing restored, the prefill never ran
    backend.release(run)


def test_a_state_that_fails_to_restore_leaves_no_slot_taken(backend):
    """A restore that raises (here: a state of another shape) fails the start and gives the
    slot it took back: the next generations neither find it busy nor make a new one."""
    prompt = backend.render(chat(SYSTEM, QUESTIONS[:1], []))
    ids = backend.tokenize(prompt)
    foreign = KVState(np.zeros((2, 3, 5, 8), np.float32), np.zeros((2, 3, 8, 5), np.float32))
    state = PrefixState(name="", text="", n_tokens=8, payload=foreign, kind=CONVERSATION, tokens=np.asarray(ids[:8], np.int32))
    generate(backend, prompt, max_tokens=1)  # a slot exists, free
    slots = len(backend._slots)
    for _ in range(3):
        with pytest.raises(ValueError):
            backend.start(prompt, SamplingParams(max_tokens=1), state, lambda p: True)
    assert not backend._busy
    text, stats, _ = generate(backend, prompt, max_tokens=4)
    assert len(backend._slots) == slots and stats.completion_tokens > 0


# -- on the daemon -----------------------------------------------------------------------


def run_chat(proc: DaemonProcess, questions: list[str], answers: list[str] | None = None, **fields) -> tuple[list[str], list[dict]]:
    """Each turn sends the whole history with the previous answers (``answers``: given ones)."""
    out: list[str] = []
    stats: list[dict] = []
    with proc.client(timeout=120) as client:
        for i in range(len(questions)):
            history = answers if answers is not None else out
            result = client.generate(messages=chat(SYSTEM, questions[: i + 1], history[:i]), max_tokens=12, **fields).wait()
            out.append(result.text)
            stats.append(result.stats)
    return out, stats


def conversations(proc: DaemonProcess) -> dict:
    with proc.client() as client:
        return client.status()["caches"]["conversations"]


@pytest.mark.parametrize("params", [{}, {"temperature": 0.8, "seed": 5}], ids=["greedy", "seeded"])
def test_a_four_turn_chat_restores_ever_more_and_answers_as_without(make_daemon, params):
    proc = make_daemon()
    plain, plain_stats = run_chat(proc, QUESTIONS, no_cache=True, **params)
    assert all(s["cached_tokens"] == 0 and s["cache_source"] is None for s in plain_stats)
    assert conversations(proc)["kept"] == 0  # no_cache neither uses nor leaves a state
    reused, stats = run_chat(proc, QUESTIONS, **params)
    assert reused == plain
    assert stats[0]["cached_tokens"] == 0 and stats[0]["cache_source"] is None
    cached = [s["cached_tokens"] for s in stats[1:]]
    assert cached == sorted(cached) and len(set(cached)) == 3, cached
    for before, s in zip(stats, stats[1:]):
        assert s["cache_source"] == {"kind": "conversation"}
        # Everything up to the previous answer was restored: only the new turn is prefilled.
        assert before["prompt_tokens"] < s["cached_tokens"] < s["prompt_tokens"]
    kept = conversations(proc)
    assert kept["kept"] == 1 and kept["hits"] == 3 and kept["bytes"] == kept["tokens"] * 46_080, kept


def test_interleaved_conversations_each_resume_their_own(make_daemon):
    proc = make_daemon()
    alone_a, _ = run_chat(proc, QUESTIONS[:3], no_cache=True)
    alone_b, _ = run_chat(proc, ASIDE[:3], no_cache=True)
    a_out: list[str] = []
    b_out: list[str] = []
    with proc.client(timeout=120) as client:
        for turn in range(3):
            for questions, out in ((QUESTIONS, a_out), (ASIDE, b_out)):
                result = client.generate(messages=chat(SYSTEM, questions[: turn + 1], out), max_tokens=12).wait()
                out.append(result.text)
                if turn:
                    assert result.stats["cache_source"] == {"kind": "conversation"}
                    assert result.stats["cached_tokens"] > result.stats["prompt_tokens"] // 2
    assert (a_out, b_out) == (alone_a, alone_b)
    kept = conversations(proc)
    # Four later turns, and B's first, which shares the system message with A's first state.
    assert kept["kept"] == 2 and kept["hits"] == 5 and kept["evictions"] == 0, kept


def test_the_memory_budget_evicts_the_least_recently_used_conversation(make_daemon):
    """A first turn's state (about 38 tokens) takes 1.7 MiB: a 2 MiB budget keeps one."""
    proc = make_daemon(env={"RKLLMD_CACHE_MEMORY_BUDGET_MB": "2"})
    with proc.client(timeout=120) as client:
        a1 = client.generate(messages=chat(SYSTEM, QUESTIONS[:1], []), max_tokens=8).wait()
        client.generate(messages=chat(SYSTEM, ASIDE[:1], []), max_tokens=8).wait()
        a2 = client.generate(messages=chat(SYSTEM, QUESTIONS[:2], [a1.text]), max_tokens=8).wait()
    kept = conversations(proc)
    assert kept["evictions"] >= 1 and kept["bytes"] <= 2 << 20, kept
    # A's state was evicted by B's: A's second turn restores no more than the system prompt
    # B shares with it.
    system_tokens = a2.stats["prompt_tokens"] - len(QUESTIONS[1])  # an upper bound
    assert a2.stats["cached_tokens"] < system_tokens


def test_conversations_can_be_switched_off(make_daemon):
    proc = make_daemon(env={"RKLLMD_CACHE_CONVERSATIONS": "false"})
    _, stats = run_chat(proc, QUESTIONS[:2])
    assert [s["cached_tokens"] for s in stats] == [0, 0]
    kept = conversations(proc)
    assert kept == {"enabled": False, "kept": 0, "tokens": 0, "bytes": 0, "hits": 0, "evictions": 0}


def test_text_cache_and_conversation_compete_longest_prefix_wins(make_daemon):
    proc = make_daemon()
    (proc.text_dir / "tutor.txt").write_text(SYSTEM)
    with proc.client(timeout=120) as client:
        client.cache_wait("tutor", timeout=120)
        # A kept conversation with another system message shares a few tokens: the cache wins.
        client.generate(messages=chat("Be terse.", ASIDE[:1], []), max_tokens=4).wait()
        first = client.generate(QUESTIONS[0], cache="tutor", max_tokens=12).wait()
        assert first.stats["cache_source"] == {"kind": "text_cache", "name": "tutor"} and first.cache == "tutor"
        system_tokens = first.stats["cached_tokens"]
        second = client.generate(messages=chat(SYSTEM, QUESTIONS[:2], [first.text]), max_tokens=12).wait()
        assert second.stats["cache_source"] == {"kind": "conversation"} and second.cache is None
        assert second.stats["cached_tokens"] > first.stats["prompt_tokens"] > system_tokens
        # Another conversation with the same system message: the kept state shares the text
        # cache's prefix and the next user turn's header, so it supplies more.
        other = client.generate(messages=chat(SYSTEM, ASIDE[:1], []), max_tokens=4).wait()
        assert other.stats["cache_source"] == {"kind": "conversation"}
        assert other.stats["cached_tokens"] > system_tokens


def test_rkllmctl_status_shows_kept_conversations(make_daemon):
    proc = make_daemon()
    run_chat(proc, QUESTIONS[:2])
    shown = rkllmctl("status", socket=proc.socket)
    assert shown.returncode == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if row.startswith("chats:"))
    kept = conversations(proc)
    assert f"{kept['kept']} kept, {kept['tokens']} tokens" in line and "1 reused, 0 evicted" in line, line
