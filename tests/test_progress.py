"""What a client sees while it waits (issue 18, item 3; protocol 1.3): its queue position as it
changes, prefill progress, the requests running and queued in status, a build's progress."""

from __future__ import annotations

import os
from typing import Any

from conftest import DaemonProcess
from reliability import poll

#: A prompt of several prefill chunks (the daemons below prefill 32 tokens at a time).
LONG_PROMPT = "Summarize: " + " ".join(f"item {i} is a small red box." for i in range(40))
#: A text cache of about 1,800 tokens: its build takes seconds.
BIG_TEXT = " ".join(f"Rule {i}: keep functions short, names clear and tests honest." for i in range(120))


def stream_messages(client, request_id: Any) -> list[dict[str, Any]]:
    """Every message of a generation's stream, in order, up to its ``done`` or ``error``."""
    messages = []
    while not messages or messages[-1]["type"] not in ("done", "error"):
        messages.append(client.receive(request_id, None))
    client._pending.pop(request_id, None)
    return messages


def first_position(client, request_id: Any) -> int:
    """The position of a generation's first message, its ``queued`` (left for the stream)."""
    message = client.receive(request_id, 60)
    assert message["type"] == "queued", message
    client._pending[request_id].appendleft(message)
    return message["position"]


def test_prefill_progress_counts_up_to_the_tokens_prefilled(make_daemon) -> None:
    proc: DaemonProcess = make_daemon(env={"RKLLMD_MODEL_PREFILL_CHUNK": "32"})
    with proc.client() as client:
        messages = stream_messages(client, client.send("generate", prompt=LONG_PROMPT, max_tokens=2, no_cache=True))
    done = messages[-1]
    assert done["type"] == "done", done
    progress = [m for m in messages if m["type"] == "progress"]
    prefilled = done["stats"]["prompt_tokens"] - done["stats"]["cached_tokens"]
    assert len(progress) == -(-prefilled // 32) >= 3, progress
    assert all(m["phase"] == "prefill" and m["total"] == prefilled for m in progress)
    counts = [m["done"] for m in progress]
    assert counts == sorted(set(counts)) and counts[-1] == prefilled, counts
    kinds = [m["type"] for m in messages]
    assert kinds.index("started") < kinds.index("progress") and max(i for i, k in enumerate(kinds) if k == "progress") < kinds.index("token")


def test_a_queued_generation_hears_its_position_fall_and_status_lists_every_request(make_daemon) -> None:
    proc: DaemonProcess = make_daemon(env={"RKLLMD_MAX_BATCH": "1"})
    with proc.client() as first, proc.client() as second, proc.client() as third, proc.client() as observer:
        long = first.send("generate", prompt="Count from one to two hundred.", max_tokens=120, no_cache=True)
        first_position(first, long)
        poll(lambda: observer.status()["requests"]["running"], 60, "the first generation running")
        waiting = second.send("generate", prompt="Say yes.", max_tokens=60, no_cache=True)
        assert first_position(second, waiting) == 1
        last = third.send("generate", prompt="Say no.", max_tokens=2, no_cache=True)
        assert first_position(third, last) == 2

        status = observer.status()
        assert status["limits"]["max_batch"] == 1
        running, queued = status["requests"]["running"], status["requests"]["queued"]
        # Every client here is this process: SO_PEERCRED names it.
        assert [r["id"] for r in running] == [long] and running[0]["client"] == f"pid {os.getpid()}"
        assert running[0]["prompt_tokens"] > 0 and running[0]["phase"] in ("prefill", "decode") and running[0]["elapsed_ms"] >= 0
        assert [(q["id"], q["position"]) for q in queued] == [(waiting, 1), (last, 2)]
        assert all(q["client"] == f"pid {os.getpid()}" and q["waited_ms"] >= 0 for q in queued)

        positions = [m["position"] for m in stream_messages(third, last) if m["type"] == "queued"]
        assert positions == [2, 1], positions
        assert stream_messages(first, long)[-1]["type"] == "done"
        assert stream_messages(second, waiting)[-1]["type"] == "done"
        assert observer.status()["requests"] == {"running": [], "queued": []}


def test_cache_ls_and_status_show_a_build_in_progress(make_daemon) -> None:
    proc: DaemonProcess = make_daemon(env={"RKLLMD_MODEL_PREFILL_CHUNK": "32"})
    with proc.client() as client:
        client.cache_put("big", BIG_TEXT)

        def building() -> dict | None:
            entry = next(e for e in client.cache_ls()["caches"] if e["name"] == "big")
            return entry if entry["build"] is not None and entry["build"]["done"] > 0 else None

        entry = poll(building, 60, "cache ls showing the build's progress", interval=0.005)
        assert entry["state"] == "building" and 0 < entry["build"]["done"] <= entry["build"]["total"], entry
        total = entry["build"]["total"]
        assert total > 1000
        build = client.status()["build"]
        assert build is None or build["name"] == "big" and build["total"] == total  # it may have ended since
        ready = client.cache_wait("big", timeout=120)
        assert ready["state"] == "ready" and ready["build"] is None and ready["tokens"] == total
        assert client.status()["build"] is None
