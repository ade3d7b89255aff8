"""Generation through the real daemon, the real client and the real model."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, DaemonProcess, reference_cases
from rkllmctl import DaemonError, DaemonUnreachable

LONG_PROMPT = "Write a very long story about a lighthouse keeper, with many chapters."


def wait_idle(client, timeout: float) -> float:
    """Seconds until the worker runs nothing, or raise."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if client.status()["worker"]["running"] is None:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"worker still busy after {timeout} s")


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: c["messages"][-1]["content"][:30])
def test_greedy_reference_reproduced_through_the_socket(daemon: DaemonProcess, case: dict) -> None:
    with daemon.client() as client:
        result = client.generate(messages=case["messages"], max_tokens=case["max_tokens"], temperature=0).wait()
    assert result.text == case["completion"]
    assert result.stats["prompt_tokens"] == case["prompt_tokens"]
    assert result.stats["completion_tokens"] == len(case["completion_ids"])
    assert result.finish_reason == ("stop" if case["stopped_on_eos"] else "length")


def test_stream_is_ordered_and_final_stats_are_complete(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        stream = client.generate("Count from one to ten in words.", max_tokens=24)
        pieces = list(stream)  # the client raises on any gap or reordering of seq numbers
    result = stream.result
    assert result is not None and pieces and "".join(pieces) == result.text
    stats = result.stats
    assert result.finish_reason in ("stop", "length")
    assert stats["completion_tokens"] >= 1 and stats["prompt_tokens"] > 10
    # The shared daemon may hold an earlier test's state with the same default system message.
    assert stats["cached_tokens"] < stats["prompt_tokens"]
    assert (stats["cached_tokens"] == 0) == (stats["cache_source"] is None)
    assert 0 < stats["prefill_ms"] <= stats["ttft_ms"] <= stats["total_ms"]
    assert stats["queue_ms"] >= 0
    if stats["completion_tokens"] > 1:
        assert stats["decode_tps"] > 0  # any speed: another process may hold the cores
    assert result.messages >= 4  # queued, started, at least one token, done


def test_max_tokens_gives_length_and_stop_strings_cut(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        capped = client.generate("Write a haiku about the sea.", max_tokens=3).wait()
        assert capped.finish_reason == "length" and capped.stats["completion_tokens"] == 3
        full = client.generate("Write a haiku about the sea.", max_tokens=48).wait()
        cut = client.generate("Write a haiku about the sea.", max_tokens=48, stop=[","]).wait()
    assert "," in full.text
    assert cut.text == full.text[: full.text.index(",")]
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(daemon: DaemonProcess) -> None:
    kwargs = dict(temperature=1.0, top_k=40, top_p=0.95, max_tokens=16)
    with daemon.client() as client:
        a = client.generate("Name a colour.", seed=1234, **kwargs).wait().text
        b = client.generate("Name a colour.", seed=1234, **kwargs).wait().text
        others = {client.generate("Name a colour.", seed=s, **kwargs).wait().text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def _arrival_order(daemon: DaemonProcess, n: int) -> None:
    clients = [daemon.client() for _ in range(n)]
    finished: list[int] = []
    lock = threading.Lock()
    try:
        streams = []
        for i, client in enumerate(clients):
            streams.append(client.generate(f"Say the number {i}.", max_tokens=4))
            client.wait_queued(streams[-1])  # taken in before the next is sent: a definite arrival order

        def consume(i: int) -> None:
            streams[i].wait()
            with lock:
                finished.append(i)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [s.position for s in streams] == list(range(n))
        assert finished == list(range(n))
        assert all(s.result.finish_reason in ("stop", "length") for s in streams)
    finally:
        for client in clients:
            client.close()


@pytest.fixture(scope="module")
def one_at_a_time():
    """A daemon that runs one generation at a time (``daemon.max_batch`` 1, as on the NPU):
    the others wait in its queue."""
    proc = DaemonProcess("--backend", "cpu", env={"RKLLMD_MAX_BATCH": "1"}).start()
    yield proc
    proc.cleanup()


@pytest.mark.parametrize("n", [2, 8])
def test_concurrent_clients_are_served_in_arrival_order(one_at_a_time: DaemonProcess, n: int) -> None:
    _arrival_order(one_at_a_time, n)


def seconds_per_token(pieces, n: int = 4) -> float:
    """At least this machine's time per token now, measured on a running stream's paced pieces: bounds on how soon
    something happens between tokens scale with it (a loaded or slower CPU is not a bug)."""
    next(pieces)
    t0 = time.monotonic()
    for _ in range(n):
        next(pieces)
    return (time.monotonic() - t0) / n


def test_cancel_queued_and_running(one_at_a_time: DaemonProcess) -> None:
    with one_at_a_time.client() as a, one_at_a_time.client() as b:
        running = a.generate(LONG_PROMPT, max_tokens=400)
        token_s = seconds_per_token(iter(running))  # it is generating (requests from two sockets may arrive in any order)
        queued = b.generate(LONG_PROMPT, max_tokens=400)
        assert b.cancel(queued.request_id)["was"] == "queued"
        assert queued.wait().finish_reason == "cancelled"
        t0 = time.monotonic()
        assert a.cancel(running.request_id)["was"] == "running"
        result = running.wait()
        assert time.monotonic() - t0 < max(1.0, 10 * token_s)  # honoured between two tokens
        assert result.finish_reason == "cancelled"
        assert result.stats["completion_tokens"] < 400
        with pytest.raises(DaemonError) as err:
            a.cancel(running.request_id)
        assert err.value.name == "not_found"


def test_killed_client_frees_the_worker_within_a_few_tokens(daemon: DaemonProcess) -> None:
    with daemon.client() as observer:
        probe = observer.generate(LONG_PROMPT, max_tokens=64)  # enough for five paced pieces on a fast machine
        token_s = seconds_per_token(iter(probe))
        probe.wait()
        before = observer.status()["counters"]["clients_gone"]
        child = subprocess.Popen(
            [sys.executable, "-m", "rkllmctl", "--socket", str(daemon.socket), "generate", "--max-tokens", "2000", LONG_PROMPT],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        assert child.stdout is not None
        child.stdout.read(1)  # the generation is streaming
        child.kill()
        child.wait()
        wait_idle(observer, timeout=max(1.0, 10 * token_s))
        status = observer.status()
    assert status["counters"]["clients_gone"] == before + 1


def test_second_daemon_on_the_same_socket_refuses(daemon: DaemonProcess) -> None:
    intruder = DaemonProcess("--backend", "cpu")
    intruder.socket = daemon.socket
    try:
        intruder.start(wait=False)
        assert intruder.wait(60) == 1
        assert "another rkllmd" in intruder.log()
    finally:
        intruder.cleanup()
    with daemon.client() as client:
        assert client.ping()["pong"] is True


def test_stale_socket_file_is_replaced_and_modes_are_private(make_daemon) -> None:
    proc = make_daemon(start=False)
    proc.socket.parent.mkdir(mode=0o700, parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(proc.socket))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    old = os.umask(0)  # the daemon must not depend on a friendly umask
    try:
        proc.start()
    finally:
        os.umask(old)
    assert stat.S_IMODE(proc.socket.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(proc.socket.stat().st_mode) == 0o660
    with proc.client() as client:
        assert client.ping()["pong"] is True


def test_sigterm_during_generation_ends_cleanly(make_daemon) -> None:
    """Every generation running (a batch of two) is cut short; the one still queued never runs."""
    proc = make_daemon(env={"RKLLMD_MAX_BATCH": "2"})
    with proc.client() as a, proc.client() as b, proc.client() as c:
        running = [client.generate(LONG_PROMPT, max_tokens=400) for client in (a, b)]
        for stream in running:
            next(iter(stream))
        waiting = c.generate(LONG_PROMPT, max_tokens=400)
        assert c.wait_queued(waiting) == 2
        proc.signal(signal.SIGTERM)
        results = [stream.wait() for stream in running]
        with pytest.raises(DaemonError) as err:
            waiting.wait()
    assert all(result.finish_reason == "cancelled" and result.reason == "shutting down" for result in results)
    assert err.value.name == "shutting_down"
    assert proc.wait(20) == 0
    assert not proc.socket.exists()


def test_client_learns_when_the_daemon_dies_mid_stream(make_daemon) -> None:
    proc = make_daemon()
    with proc.client() as client:
        stream = client.generate(LONG_PROMPT, max_tokens=400)
        pieces = iter(stream)
        next(pieces)
        proc.signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnreachable, match="closed the connection"):
            for _ in pieces:
                pass
        assert time.monotonic() - t0 < 5


#: 250,000 characters shaped to be slow to tokenize: long runs of one kind (each a single
#: piece to merge; 60,000 different CJK characters, a quadratic merge took minutes), words,
#: numbers, punctuation. About a second for the CPU backend's tokenizer.
CJK_RUN = "".join(chr(0x4E00 + i * 7919 % 20_000) for i in range(60_000))
HEAVY_TEXT = (CJK_RUN + " " + ("word " * 20_000) + ("x" * 40_000) + ("!?" * 20_000) + ("3.14 " * 10_000))[:250_000]


def test_a_long_text_being_tokenized_never_holds_up_other_clients(daemon: DaemonProcess) -> None:
    """One client renders and generates with 250,000 characters while another pings: every
    ping is answered within 100 ms. The tokenizing runs on the worker's prompt thread, never
    on the socket loop; no call of the tokenizer holds the GIL for long."""
    outcome: dict[str, object] = {}

    def heavy() -> None:
        with daemon.client(timeout=120) as client:
            outcome["render"] = client.render([{"role": "user", "content": HEAVY_TEXT}])
            try:
                client.generate(HEAVY_TEXT, max_tokens=1).wait()
            except DaemonError as exc:
                outcome["generate"] = exc

    with daemon.client(timeout=10) as pinger:
        pinger.ping()
        worker = threading.Thread(target=heavy, daemon=True)
        worker.start()
        latencies = []
        while worker.is_alive():
            started = time.monotonic()
            pinger.ping()
            latencies.append(time.monotonic() - started)
            time.sleep(0.005)
        worker.join()
    render, error = outcome["render"], outcome["generate"]
    assert CJK_RUN in render["text"] and render["tokens"] > 4096
    assert isinstance(error, DaemonError) and error.name == "context_overflow"
    assert error.details["prompt_tokens"] == render["tokens"]  # the same text, counted alike
    assert len(latencies) > 20, latencies  # the pings overlapped the work
    assert max(latencies) < 0.1, sorted(latencies)[-5:]
