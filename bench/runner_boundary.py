"""What the runner process boundary costs: the same greedy generation on a daemon whose model
runs in a runner process (``daemon.runners = "process"``, the default) and on one whose model
runs in the daemon's own process (``"thread"``), interleaved in one run.

Each token crosses the boundary as one frame on a socketpair (pickled in the runner, read by
the daemon's reader thread, then queued in the Outbox as before). The goal: under 2 % of
decode time. Also shown: what one frame costs, runner to daemon, measured alone.

Run: python bench/runner_boundary.py [--repeat 9 --max-tokens 128]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import print_overhead, running_daemon, words  # noqa: E402

from rkllmctl import Client  # noqa: E402
from rkllmd.runner.channel import Channel  # noqa: E402

#: A runner-side sender of N token frames, as its outbox sends them (run by ``frame_cost``).
_SENDER = """
import socket, sys
from rkllmd.runner.channel import Channel
channel = Channel(socket.socket(fileno=int(sys.argv[1])))
for i in range(int(sys.argv[2])):
    channel.send(("stream", 7, "token", {"text": " word"}))
channel.send(("end",))
"""


def generation(client: Client, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT ms, decode tokens/s as the client sees them, completion tokens)."""
    started = time.perf_counter()
    stream = client.generate(messages=messages, max_tokens=max_tokens, no_cache=True, temperature=0)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    ended = time.perf_counter()
    n = stream.result.stats["completion_tokens"]
    return (first - started) * 1000, (n - 1) / (ended - first), n


def frame_cost(frames: int) -> float:
    """Microseconds per token frame from another process to a reading thread, end to end."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", _SENDER, str(theirs.fileno()), str(frames)], pass_fds=(theirs.fileno(),),
                            cwd=Path(__file__).resolve().parent.parent)
    theirs.close()
    channel = Channel(ours)
    message = channel.receive()  # the first one: the sender has started
    started = time.perf_counter()
    count = 1
    while (message := channel.receive())[0] != "end":
        count += 1
    elapsed = time.perf_counter() - started
    proc.wait()
    channel.close()
    return elapsed / (count - 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    messages = [{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}]

    threads, processes = [], []
    with running_daemon(env={"RKLLMD_RUNNERS": "thread"}) as inside, running_daemon(env={"RKLLMD_RUNNERS": "process"}) as runner, \
            Client(inside.socket, timeout=60) as in_daemon, Client(runner.socket, timeout=60) as in_runner:
        generation(in_daemon, messages, 4)  # warm-up of both
        generation(in_runner, messages, 4)
        for i in range(args.repeat):
            pair = [(in_daemon, threads), (in_runner, processes)]
            for client, runs in pair if i % 2 == 0 else reversed(pair):  # neither always goes first
                runs.append(generation(client, messages, args.max_tokens))
    print_overhead("in the daemon's process", "in a runner process", "the boundary", threads, processes, args.prompt_tokens)
    per_token_ms = 1000 / statistics.median(r[1] for r in processes)
    cost = statistics.median(frame_cost(20000) for _ in range(3))
    print(f"\none token frame, runner to daemon, alone: {cost:.1f} µs ({cost / 10 / per_token_ms:.3f} % of a {per_token_ms:.1f} ms decode step)")


if __name__ == "__main__":
    main()
