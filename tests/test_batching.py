"""Generations that run at once on the CPU backend are decoded together (issue 18, items 1
and 2): each stream's output is what it is alone, one stream's cancel stops only it, clients
take turns, and a cache build lets a short request run between its prefill chunks, yet
completes under steady traffic (issue 22, item 4)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from conftest import DaemonProcess
from rkllmctl import DaemonError
from reliability import poll
from test_progress import BIG_TEXT, first_position, stream_messages

QUESTIONS = ["Name three rivers of Europe.", "What is a prime number?", "Write a haiku about rain.", "Count to ten."]


@pytest.fixture(scope="module")
def batching() -> DaemonProcess:
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MAX_BATCH": "4"}).start()
    yield proc
    proc.cleanup()


def outcome(client, request_id: Any) -> tuple[str, dict[str, Any]]:
    """A generation's whole answer text and its final message."""
    messages = stream_messages(client, request_id)
    return "".join(m["text"] for m in messages if m["type"] == "token"), messages[-1]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 30, "seed": 7}], ids=["greedy", "seeded"])
def test_streams_decoded_together_are_each_what_they_are_alone(batching: DaemonProcess, sampling: dict) -> None:
    fields = {"max_tokens": 40, "no_cache": True, **sampling}
    with batching.client() as client:
        solo = [outcome(client, client.send("generate", prompt=q, **fields)) for q in QUESTIONS]
    clients = [batching.client() for _ in QUESTIONS]
    try:
        ids = [client.send("generate", prompt=q, **fields) for client, q in zip(clients, QUESTIONS)]
        with batching.client() as observer:
            running = poll(lambda: len(observer.status()["requests"]["running"]) >= 3, 60, "three or more decoded together")
        together = [outcome(client, i) for client, i in zip(clients, ids)]
    finally:
        for client in clients:
            client.close()
    assert running
    for (text, done), (solo_text, solo_done) in zip(together, solo):
        assert done["type"] == solo_done["type"] == "done", done
        assert text == solo_text and done["finish_reason"] == solo_done["finish_reason"]
        assert done["stats"]["completion_tokens"] == solo_done["stats"]["completion_tokens"]


def test_cancelling_one_stream_stops_only_that_one(batching: DaemonProcess) -> None:
    fields = {"max_tokens": 30, "no_cache": True}
    with batching.client() as client:
        solo = [outcome(client, client.send("generate", prompt=q, **fields)) for q in QUESTIONS[:3]]
    clients = [batching.client() for _ in range(3)]
    try:
        ids = [client.send("generate", prompt=q, **fields) for client, q in zip(clients, QUESTIONS)]
        first = clients[1].receive(ids[1], 60)
        while first["type"] != "token":  # it is decoding
            first = clients[1].receive(ids[1], 60)
        assert clients[1].cancel(ids[1])["was"] == "running"
        cancelled = outcome(clients[1], ids[1])[1]
        kept = [outcome(clients[i], ids[i]) for i in (0, 2)]
    finally:
        for client in clients:
            client.close()
    assert cancelled["finish_reason"] == "cancelled" and cancelled["reason"] == "cancelled"
    assert cancelled["stats"]["completion_tokens"] < 30
    for (text, done), (solo_text, solo_done) in zip(kept, (solo[0], solo[2])):
        assert text == solo_text and done["stats"]["completion_tokens"] == solo_done["stats"]["completion_tokens"]


def test_a_client_with_many_requests_does_not_keep_another_waiting(make_daemon) -> None:
    """Clients take turns: the second client's one request starts before the first's third."""
    proc: DaemonProcess = make_daemon(env={"RKLLMD_MAX_BATCH": "2"})
    with proc.client() as greedy, proc.client() as polite:
        mine = [greedy.send("generate", prompt=f"Count to {n}.", max_tokens=20, no_cache=True) for n in (30, 40, 50, 60)]
        assert [first_position(greedy, i) for i in mine] == [0, 1, 2, 3]
        poll(lambda: len(greedy.status()["requests"]["running"]) == 2, 60, "two of them running")
        theirs = polite.send("generate", prompt="Say hi.", max_tokens=4, no_cache=True)
        assert first_position(polite, theirs) == 2  # behind the two running, before the other two
        queued = [q["id"] for q in polite.status()["requests"]["queued"]]
        assert queued == [theirs, *mine[2:]]
        for i in mine:
            outcome(greedy, i)
        outcome(polite, theirs)


def test_a_short_request_runs_between_the_chunks_of_a_long_build(make_daemon) -> None:
    proc: DaemonProcess = make_daemon()
    with proc.client() as client, proc.client() as builder:
        builder.cache_put("big", BIG_TEXT)
        building = poll(lambda: next(e for e in builder.cache_ls()["caches"] if e["name"] == "big")["build"], 60,
                        "the build under way", interval=0.005)
        request = client.send("generate", prompt="Say hi.", max_tokens=4, no_cache=True)
        text, done = outcome(client, request)
        entry = next(e for e in builder.cache_ls()["caches"] if e["name"] == "big")
        # Started and finished while the build was still going (not behind its whole prefill).
        assert done["type"] == "done" and entry["state"] == "building", (done, entry)
        assert entry["build"]["done"] < entry["build"]["total"] == building["total"]
        ready = builder.cache_wait("big", timeout=180)
        assert ready["state"] == "ready" and ready["tokens"] == building["total"]
        # The build that made way for the request is still exact: the cache changes nothing.
        with_cache = outcome(client, client.send("generate", prompt="Which rule is 7?", cache="big", max_tokens=12))
        without = outcome(client, client.send("generate", prompt="Which rule is 7?", system=BIG_TEXT, no_cache=True, max_tokens=12))
    assert with_cache[1]["stats"]["cached_tokens"] == building["total"] and without[1]["stats"]["cached_tokens"] == 0
    assert with_cache[0] == without[0] and with_cache[1]["stats"]["completion_tokens"] == without[1]["stats"]["completion_tokens"]


def test_a_build_completes_under_steady_traffic(make_daemon) -> None:
    """Two clients ask for short generations back to back, so generations are always due. A
    text cache's build still gets a prefill chunk whenever it has waited build_max_wait_ms:
    it completes within its idle time plus that wait and a generation step per chunk, and the
    traffic is served between its chunks. (Builds used to run only when nothing was due.)"""
    wait_s, chunk = 0.3, 64
    proc: DaemonProcess = make_daemon(env={"RKLLMD_BUILD_MAX_WAIT_MS": str(int(wait_s * 1000)), "RKLLMD_MODEL_PREFILL_CHUNK": str(chunk)})
    text = " ".join(f"Rule {i}: keep functions short, names clear and tests honest." for i in range(40))
    with proc.client() as builder:
        started = time.monotonic()
        builder.cache_put("idle", text)
        idle = builder.cache_wait("idle", timeout=120)
        idle_s = time.monotonic() - started
    chunks = math.ceil(idle["tokens"] / chunk)
    bound = idle_s + chunks * (wait_s + 0.5) + 1.0

    stop, served = threading.Event(), []

    def traffic() -> None:
        with proc.client() as client:
            while not stop.is_set():
                served.append((time.monotonic(), client.generate("Say hi.", max_tokens=3, no_cache=True).wait()))

    loops = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for loop in loops:
        loop.start()
    try:
        poll(lambda: len(served) >= 4, 60, "the traffic flowing")
        with proc.client() as builder:
            started = time.monotonic()
            builder.cache_put("busy", text + " Be kind.")
            try:
                busy = builder.cache_wait("busy", timeout=bound)
            except DaemonError as exc:
                pytest.fail(f"the build did not complete within {bound:.1f} s under traffic: {exc}")
            took = time.monotonic() - started
    finally:
        stop.set()
        for loop in loops:
            loop.join(30)
    assert busy["state"] == "ready" and took < bound, (took, bound)
    # The traffic went on meanwhile: both clients were answered during the build.
    during = [done for at, done in served if started < at < started + took]
    assert len(during) >= 2 and all(d.finish_reason == "length" for d in during)


def test_a_build_a_request_needs_lets_other_requests_run_between_its_chunks(make_daemon) -> None:
    """A request whose prefix's cache is due has it built first (nothing else runs): that
    build too lets a request arriving meanwhile run between its chunks."""
    # One generation at a time: the request runs alone (a build for it waits for no other); the
    # build queued by the put waits for generations as long as it takes.
    proc: DaemonProcess = make_daemon(env={"RKLLMD_MAX_BATCH": "1", "RKLLMD_BUILD_MAX_WAIT_MS": "600000"})
    with proc.client() as first, proc.client() as needs, proc.client() as other:
        busy = first.generate("Count to twenty.", max_tokens=16, no_cache=True)
        next(iter(busy))  # the worker is busy: the build queued by the put waits
        needs.cache_put("big", BIG_TEXT)
        wanting = needs.generate("Which rule is 7?", cache="big", max_tokens=4)
        assert needs.wait_queued(wanting) == 1
        busy.wait()
        building = poll(lambda: next(e for e in needs.cache_ls()["caches"] if e["name"] == "big")["build"], 60,
                        "the build under way", interval=0.005)
        text, done = outcome(other, other.send("generate", prompt="Say hi.", max_tokens=4, no_cache=True))
        entry = next(e for e in needs.cache_ls()["caches"] if e["name"] == "big")
        assert done["type"] == "done" and entry["state"] == "building", (done, entry)
        result = wanting.wait()
    assert (result.cache, result.stats["cached_tokens"]) == ("big", building["total"])


def test_cancelling_a_request_during_a_build_leaves_the_build_alone(make_daemon) -> None:
    """A request admitted between a build's chunks and cancelled while it opens (its prefix
    state read from disk: hundreds of ms) ends cancelled; the build goes on, not restarted
    (the two used to share one abort flag)."""
    proc: DaemonProcess = make_daemon(env={"RKLLMD_CACHE_MEMORY_BUDGET_MB": "0", "RKLLMD_CACHE_CONVERSATIONS": "false"})
    with proc.client() as client, proc.client() as builder:
        builder.cache_put("rules", BIG_TEXT)
        builder.cache_wait("rules", timeout=180)
        builder.cache_put("more", BIG_TEXT + " Be kind.")
        poll(lambda: next(e for e in builder.cache_ls()["caches"] if e["name"] == "more")["build"], 60,
             "the build under way", interval=0.005)
        request = client.send("generate", prompt="Which rule is 7?", cache="rules", max_tokens=4)
        message = client.receive(request, 60)
        while message["type"] != "started":
            message = client.receive(request, 60)
        assert client.cancel(request)["was"] == "running"
        _, done = outcome(client, request)
        entry = next(e for e in builder.cache_ls()["caches"] if e["name"] == "more")
        ready = builder.cache_wait("more", timeout=180)
    assert done["finish_reason"] == "cancelled" and entry["state"] == "building", (done, entry)
    assert ready["state"] == "ready"
    log = proc.log()
    assert log.count("building binary cache more") == 1 and "more was interrupted" not in log
