"""Concurrent streams through the daemon (issue 18): decode tokens/s of 1, 2, 4 and 8
generations at once, aggregate and per stream, against one alone; and how long a short
request waits during a long cache build, against the rest of that build (what it waited
when builds ran to the end first).

Each stream is its own client (the real one) on a daemon with ``daemon.max_batch`` 8;
every stream generates the same greedy answer, so each count decodes the same tokens.
Per-stream speed is the daemon's ``decode_tps`` (median of the streams); aggregate is the
sum of the streams' ``decode_tps`` (they decode over the same steps: the clients start
together), and, stricter, every token after each stream's first over the wall time from
the first stream's first token to the last one's end (the later streams' prefill steps
included). Ratios are measured side by side in one run; on a shared machine only they
mean anything.

    .venv/bin/python bench/concurrent_streams.py [--tokens 96] [--rounds 2] [--plot docs/concurrent_streams.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon import running_daemon, words  # noqa: E402
from rkllmctl import Client  # noqa: E402

PROMPT = "Write a very long story about a lighthouse keeper, with many chapters."
COUNTS = (1, 2, 4, 8)


def stream(sock: Path, tokens: int, out: list, barrier: threading.Barrier) -> None:
    """One client's generation: (first token time, end time, completion tokens, decode_tps)."""
    with Client(sock, timeout=60) as client:
        barrier.wait()
        generation = client.generate(PROMPT, max_tokens=tokens, no_cache=True)
        first = None
        for _ in generation:
            first = first or time.perf_counter()
        result = generation.result
        assert result.finish_reason == "length", "a stream must decode all its tokens"
        out.append((first, time.perf_counter(), result.stats["completion_tokens"], result.stats["decode_tps"]))


def concurrent(sock: Path, n: int, tokens: int) -> tuple[float, float, float]:
    """(aggregate, wall-clock aggregate, median per-stream) tokens/s of ``n`` streams at once."""
    out: list = []
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=stream, args=(sock, tokens, out, barrier)) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({o[2] for o in out}) == 1, "every stream must generate the same tokens"
    span = max(o[1] for o in out) - min(o[0] for o in out)
    return sum(o[3] for o in out), sum(o[2] - 1 for o in out) / span, statistics.median(o[3] for o in out)


def build_wait(sock: Path, text_tokens: int) -> tuple[float, float, float, int]:
    """(the build alone in s, what a short request asked a quarter into it would have waited
    for the rest of it in s, what it waited now: from sending to its first token, in s, tokens)."""
    with Client(sock, timeout=60) as client, Client(sock, timeout=60) as asker:
        client.cache_put("long", words(text_tokens))
        alone = client.cache_wait("long", timeout=600)
        build_s, total = alone["build_ms"] / 1000, alone["tokens"]
        client.cache_rebuild("long")
        while True:
            entry = next(e for e in client.cache_ls()["caches"] if e["name"] == "long")
            if entry["build"] and entry["build"]["done"] >= total // 4:
                break
            time.sleep(0.005)
        remaining = build_s * (1 - entry["build"]["done"] / total)
        sent = time.perf_counter()
        generation = asker.generate("Say hi.", max_tokens=4, no_cache=True)
        next(iter(generation))
        waited = time.perf_counter() - sent
        generation.wait()
        client.cache_wait("long", timeout=600)
    return build_s, remaining, waited, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96, help="tokens each stream generates")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each count (the median is shown)")
    parser.add_argument("--build-tokens", type=int, default=1800, help="tokens of the text cache built")
    parser.add_argument("--plot", type=Path, help="write a PNG of tokens/s against concurrent streams")
    args = parser.parse_args()

    with running_daemon(env={"RKLLMD_MAX_BATCH": str(max(COUNTS))}) as daemon:
        concurrent(daemon.socket, 1, 8)  # warm up
        figures: dict[int, list[tuple[float, float, float]]] = {n: [] for n in COUNTS}
        for _ in range(args.rounds):  # counts interleaved: a load that comes and goes hits all alike
            for n in COUNTS:
                figures[n].append(concurrent(daemon.socket, n, args.tokens))
        build_s, remaining, waited, total = build_wait(daemon.socket, args.build_tokens)

    aggregate, wall, per_stream = ({n: statistics.median(f[i] for f in figures[n]) for n in COUNTS} for i in range(3))
    print(f"\n{args.tokens} tokens a stream, greedy, median of {args.rounds} rounds; daemon.max_batch {max(COUNTS)}\n")
    print("| streams | aggregate decode tokens/s | x one alone | all tokens / wall time | x one alone | per-stream tokens/s | x one alone |")
    print("|---|---|---|---|---|---|---|")
    for n in COUNTS:
        print(f"| {n} | {aggregate[n]:.1f} | {aggregate[n] / aggregate[1]:.2f} | {wall[n]:.1f} | {wall[n] / wall[1]:.2f} "
              f"| {per_stream[n]:.1f} | {per_stream[n] / per_stream[1]:.2f} |")
    print(f"\na short request during a {total}-token cache build ({build_s:.2f} s alone), asked a quarter into it:\n")
    print("| | seconds to its first token |")
    print("|---|---|")
    print(f"| waiting for the rest of the build (builds run to the end first) | {remaining:.2f} |")
    print(f"| the build yields between its prefill chunks | {waited:.2f} |")
    if args.plot:
        from plotting import line_plot

        line_plot(args.plot, list(COUNTS), [
            ("aggregate", "o-", [aggregate[n] for n in COUNTS]),
            ("all tokens / wall time", "^:", [wall[n] for n in COUNTS]),
            ("per stream", "s--", [per_stream[n] for n in COUNTS]),
        ], "concurrent streams", "decode tokens/s")


if __name__ == "__main__":
    main()
