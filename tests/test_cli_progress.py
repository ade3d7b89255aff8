"""What rkllmctl shows while a request waits (issue 18): a live line on a terminal's stderr
(queue position, prefill and build percentages), nothing when stderr is not a terminal;
the builds and requests in cache ls and status."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, DaemonProcess
from reliability import poll
from rkllmctl import Piece, Progress, Queued, Started
from rkllmctl.aio import AsyncClient
from rkllmctl.cli import main

#: Several prefill chunks of 32 tokens.
LONG_PROMPT = "Summarize: " + " ".join(f"item {i} is a small red box." for i in range(40))
#: A text cache of about 1,800 tokens: its build takes seconds.
BIG_TEXT = " ".join(f"Rule {i}: keep functions short, names clear and tests honest." for i in range(120))
ESC = "\x1b"


@pytest.fixture
def busy_daemon(make_daemon) -> DaemonProcess:
    """One generation at a time, prefilled 32 tokens at a time: waits and progress to show."""
    return make_daemon(env={"RKLLMD_MODEL_PREFILL_CHUNK": "32", "RKLLMD_MAX_BATCH": "1"})


def run_cli(socket: Path, *args: str, terminal: bool) -> tuple[int, str, str]:
    """rkllmctl as a process, stdout a pipe and stderr a pseudo-terminal (or a pipe): its
    exit code, stdout and everything written to stderr (carriage returns kept)."""
    command = [sys.executable, "-m", "rkllmctl", "--socket", str(socket), *args]
    env = {**os.environ, "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    if not terminal:
        run = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
        return run.returncode, run.stdout, run.stderr
    master, slave = pty.openpty()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    os.close(slave)
    seen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    out = child.communicate(timeout=180)[0].decode()
    reader.join(10)
    os.close(master)
    return child.returncode, out, seen.decode().replace("\r\n", "\n")  # the terminal's newline translation


def start_long_generation(proc: DaemonProcess):
    """A client whose generation runs long enough for the next one to queue behind it."""
    client = proc.client()
    stream = client.generate("Count from one to three hundred.", max_tokens=300, no_cache=True)
    client.wait_queued(stream)
    with proc.client() as observer:
        poll(lambda: observer.status()["requests"]["running"], 60, "the first generation running")
    return client, stream


def generate_behind_a_long_one(daemon: DaemonProcess, terminal: bool) -> tuple[int, str, str]:
    """``rkllmctl generate`` queued behind a long generation: (exit code, stdout, stderr)."""
    client, stream = start_long_generation(daemon)
    try:
        return run_cli(daemon.socket, "generate", "--max-tokens", "4", "--no-cache", LONG_PROMPT, terminal=terminal)
    finally:
        stream.wait()
        client.close()


def test_generate_on_a_terminal_shows_queue_position_then_prefill_then_erases_it(busy_daemon: DaemonProcess) -> None:
    code, out, terminal = generate_behind_a_long_one(busy_daemon, terminal=True)
    assert code == 0, terminal
    assert out.strip()
    assert "\rqueued: 1 ahead" in terminal
    percents = [int(p) for p in re.findall(r"\rprefill (\d+)%", terminal)]
    assert percents and percents == sorted(percents) and all(0 < p <= 100 for p in percents), terminal
    assert terminal.index("queued: 1 ahead") < terminal.index("prefill ")
    # Erased before the stats line: spaces over the last text, back to the line's start.
    assert re.search(r"\rprefill (\d+)%\r {11,12}\r\[finish: length; [^\r]*\n$", terminal), terminal
    assert ESC not in terminal


def test_generate_without_a_terminal_shows_no_live_line(busy_daemon: DaemonProcess) -> None:
    code, out, err = generate_behind_a_long_one(busy_daemon, terminal=False)
    assert code == 0, err
    assert err.startswith("[finish: length") and err.count("\n") == 1, err
    assert "\r" not in err and "queued:" not in err and "%" not in err and ESC not in err + out


def test_cache_wait_on_a_terminal_shows_the_build_percentage(busy_daemon: DaemonProcess) -> None:
    with busy_daemon.client() as client:
        client.cache_put("big", BIG_TEXT)
    code, _, terminal = run_cli(busy_daemon.socket, "cache", "wait", "big", "--timeout", "120", terminal=True)
    assert code == 0, terminal
    percents = [(int(p), int(t)) for p, t in re.findall(r"\rbig: building (\d+)% of (\d+) tokens", terminal)]
    assert percents, terminal
    tokens = percents[0][1]
    assert tokens > 1000 and [p for p, _ in percents] == sorted(p for p, _ in percents)
    assert re.search(rf"\r +\rbig: ready, {tokens} tokens, built in [0-9.]+ s\n$", terminal), terminal
    assert ESC not in terminal


def test_cache_wait_without_a_terminal_prints_only_the_outcome(busy_daemon: DaemonProcess) -> None:
    with busy_daemon.client() as client:
        client.cache_put("big", BIG_TEXT)
    code, out, err = run_cli(busy_daemon.socket, "cache", "wait", "big", "--timeout", "120", terminal=False)
    assert code == 0, err
    assert out == "" and re.fullmatch(r"big: ready, \d+ tokens, built in [0-9.]+ s\n", err), err


def test_cache_wait_on_a_terminal_still_times_out_with_124(busy_daemon: DaemonProcess) -> None:
    with busy_daemon.client() as client:
        client.cache_put("big", BIG_TEXT)
    code, _, terminal = run_cli(busy_daemon.socket, "cache", "wait", "big", "--timeout", "0.6", terminal=True)
    assert code == 124, terminal
    assert "big is not ready yet" in terminal


def test_cache_ls_and_status_show_the_build_in_progress(busy_daemon: DaemonProcess, capsys) -> None:
    with busy_daemon.client() as client:
        client.cache_put("big", BIG_TEXT)
        poll(lambda: (client.cache_show("big").get("build") or {}).get("done"), 60, "the build under way", interval=0.005)
        assert main(["--socket", str(busy_daemon.socket), "cache", "ls"]) == 0
        assert main(["--socket", str(busy_daemon.socket), "status"]) == 0
        client.cache_wait("big", 120)
    out = capsys.readouterr().out
    listed = re.search(r"^big .* building (\d+)% of (\d+) tokens$", out, re.M)
    assert listed, out
    # The build may have ended between the two commands: then status shows none.
    shown = re.search(r"^build: +cache big (\d+)% of (\d+) tokens$", out, re.M)
    assert shown is None and "build:" not in out or shown.group(2) == listed.group(2), out


def test_status_lists_running_and_queued_requests(busy_daemon: DaemonProcess, capsys) -> None:
    client, stream = start_long_generation(busy_daemon)
    try:
        waiting = client.generate("Say yes.", max_tokens=2, no_cache=True)
        assert client.wait_queued(waiting) == 1
        assert main(["--socket", str(busy_daemon.socket), "status"]) == 0
    finally:
        stream.wait()
        waiting.wait()
        client.close()
    out = capsys.readouterr().out
    pid = f"pid {os.getpid()}"
    assert "requests: 1 running (up to 1 decoded together), 1 queued" in out, out
    assert re.search(rf"^  running +{stream.request_id} +{pid} +(prefill \d+ of \d+ prompt tokens|prompt \d+ tokens), \d+ generated, [0-9.]+ s$", out, re.M), out
    assert re.search(rf"^  queued +{waiting.request_id} +{pid} +1 ahead, waiting [0-9.]+ s$", out, re.M), out


def test_the_client_libraries_hand_over_the_wait_as_events(busy_daemon: DaemonProcess) -> None:
    """Stream.events() and AsyncStream.events(): Queued (again as the position falls),
    Started, Progress up to the whole prompt, then the Pieces; iteration gives text alone."""
    client, stream = start_long_generation(busy_daemon)
    try:
        with busy_daemon.client() as second, busy_daemon.client() as third:
            behind = second.generate("Say yes.", max_tokens=2, no_cache=True)
            assert second.wait_queued(behind) == 1
            last = third.generate(LONG_PROMPT, max_tokens=3, no_cache=True)
            assert third.wait_queued(last) == 2
            events = list(last.events())
            behind.wait()
    finally:
        stream.wait()
        client.close()
    kinds = [type(e).__name__ for e in events]
    positions = [e.position for e in events if isinstance(e, Queued)]
    assert positions[:2] == [2, 1] and positions == sorted(set(positions), reverse=True), events
    first_piece = kinds.index("Piece")
    assert kinds.index("Started") < kinds.index("Progress") < first_piece
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].percent == 100 and progress[-1].done == progress[-1].total == last.result.stats["prompt_tokens"]
    assert "".join(e.text for e in events if isinstance(e, Piece)) == last.result.text
    assert last.position == 2  # when it was queued, as before protocol 1.3


def test_the_asyncio_client_hands_over_progress(busy_daemon: DaemonProcess) -> None:
    async def follow() -> tuple[list, str]:
        async with AsyncClient(busy_daemon.socket, timeout=30) as client:
            async with client.generate(prompt=LONG_PROMPT, max_tokens=3, no_cache=True) as stream:
                events = [event async for event in stream.events()]
                return events, stream.result.text

    events, text = asyncio.run(follow())
    assert isinstance(events[0], Queued) and isinstance(events[1], Started)
    assert [e.percent for e in events if isinstance(e, Progress)][-1] == 100
    assert "".join(e.text for e in events if isinstance(e, Piece)) == text
