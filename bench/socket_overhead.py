"""What the daemon adds: TTFT and decode rate through the socket vs the backend in-process.

Both run the same greedy generation in one process run, interleaved, on the same model.
Run: python bench/socket_overhead.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR, print_overhead, running_daemon, words  # noqa: E402

from rkllmctl import Client  # noqa: E402
from rkllmd.sampling import SamplingParams  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402


def in_process(backend: CpuBackend, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT ms as the caller sees it, decode tokens/s, completion tokens)."""
    first: list[float] = []
    started = time.perf_counter()

    def sink(text: str) -> bool:
        if not first:
            first.append(time.perf_counter())
        return True

    prompt = backend.render(messages)
    stats = backend.generate(prompt, SamplingParams(max_tokens=max_tokens), None, sink)
    ended = time.perf_counter()
    return (first[0] - started) * 1000, (stats.completion_tokens - 1) / (ended - first[0]), stats.completion_tokens


def through_socket(client: Client, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    stream = client.generate(messages=messages, max_tokens=max_tokens, no_cache=True)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    ended = time.perf_counter()
    n = stream.result.stats["completion_tokens"]
    return (first - started) * 1000, (n - 1) / (ended - first), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    messages = [{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}]

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    local, remote = [], []
    with running_daemon() as daemon, Client(daemon.socket, timeout=60) as client:
        through_socket(client, messages, 4)  # warm-up of both sides
        in_process(backend, messages, 4)
        for _ in range(args.repeat):
            remote.append(through_socket(client, messages, args.max_tokens))
            local.append(in_process(backend, messages, args.max_tokens))
    print_overhead("in-process", "through the socket", "socket", local, remote, args.prompt_tokens)


if __name__ == "__main__":
    main()
