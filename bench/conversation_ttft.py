"""Conversations reusing their own state: time to first token per turn of a 10-turn chat.

For every turn of a greedy chat with a ~440-token system prompt (the issue's case) whose
history grows by each answer, --runs times (each run a fresh reuse daemon and the whole
chat; every figure min/median/max over the runs):
- cold: a daemon asked with `no_cache` prefills the whole conversation;
- reuse: a daemon that keeps each turn's state restores the longest common token prefix;
- limit, what reuse cannot beat, each part measured in the same run: restoring the kept
  state (its bytes, restored tokens x KV bytes per token, read at the bandwidth
  bench/read_limit.c measures), plus prefilling only the tokens reuse did not restore (at
  their positions, after the rest, in process), plus one decode step (in process),
  each the fastest of 3 tries in the run.
The daemon copies only the positions its slot does not hold already (a conversation that
comes back to its own slot copies nothing), so reuse can undercut the restore part;
"reuse / compute" leaves it out.
Then: bytes of memory per kept token (status), and two conversations taking turns on one
daemon (each turn restores its own conversation's state, not the other's; one run).
Run: python bench/conversation_ttft.py [--turns 10] [--runs 5] (about 4 minutes;
quick: --turns 4 --runs 5, about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR, running_daemon, words  # noqa: E402
import read_limit  # noqa: E402  (after daemon, which imports rkllmd first)
from plotting import line_plot  # noqa: E402

from rkllmctl import Client  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402

SYSTEM = "You are the assistant of a small embedded-systems team. House rules and context follow. " + words(420)
QUESTIONS = [
    "What is a mutex?", "And a semaphore?", "When would I use one over the other?", "Show a tiny C example.",
    "What can go wrong?", "How do I debug a deadlock?", "What is priority inversion?", "How does Linux avoid it?",
    "Summarise our chat in one line.", "Thanks, that is all.",
]
OTHER = ["Name three sorting algorithms.", "Which is stable?", "Which is fastest on nearly sorted data?", "Why?", "Thanks."]
ANSWER_TOKENS = 40


def messages(questions: list[str], answers: list[str]) -> list[dict[str, str]]:
    out = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(questions):
        out.append({"role": "user", "content": question})
        if i < len(answers):
            out.append({"role": "assistant", "content": answers[i]})
    return out


def prefill_and_step_ms(backend: CpuBackend, prompt: str, restored: int, tries: int = 3) -> tuple[float, float]:
    """In process: the prefill of the tokens after ``restored`` at their positions (the
    prefix prefilled first, untimed), then one decode step; each in ms, the fastest of
    ``tries`` (a limit: one try alone, cold, came out slower than the daemon's reuse)."""
    ids = backend.tokenizer.encode(prompt)
    model = backend.model
    slot = model.new_slot()
    if restored:
        model.prefill(slot, ids[:restored], 0)
    prefills, steps = [], []
    for _ in range(tries):
        t0 = time.perf_counter()
        logits = model.prefill(slot, ids[restored:], restored)
        t1 = time.perf_counter()
        model.decode(slot, int(logits.argmax()), len(ids))
        prefills.append((t1 - t0) * 1000)
        steps.append((time.perf_counter() - t1) * 1000)
    return min(prefills), min(steps)


def spread(values: list[float], fmt: str = ".0f") -> str:
    """min/median/max of a figure's runs."""
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


@dataclass
class Turn:
    prompt_tokens: int = 0
    restored: int = 0
    cold: list[float] = field(default_factory=list)
    reuse: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)  # the kept state's bytes at the probe's bandwidth
    prefill: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)

    def limits(self) -> list[float]:
        return [r + p + s for r, p, s in zip(self.restore, self.prefill, self.step)]


def chat(client: Client, questions: list[str], answers: list[str], **fields) -> tuple[str, dict, float]:
    result = client.generate(messages=messages(questions, answers), max_tokens=ANSWER_TOKENS, temperature=0, **fields).wait()
    return result.text, result.stats, result.client_ttft_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    parser.add_argument("--runs", type=int, default=5, help="runs of the whole chat (min/median/max over them)")
    parser.add_argument("--plot", type=Path, help="write a PNG of each turn's median TTFT, cold, with reuse and the limit")
    args = parser.parse_args()

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    kv_bytes = backend.model.config.kv_bytes_per_token
    probe_bytes = read_limit.streamed_bytes(backend.model.w)
    turns = [Turn() for _ in range(args.turns)]
    bandwidths: list[float] = []
    with running_daemon() as cold_daemon, Client(cold_daemon.socket, timeout=600) as cold:
        for _ in range(args.runs):
            bandwidth = read_limit.measure(probe_bytes, rounds=3).best_gbps  # this run's, GB/s
            bandwidths.append(bandwidth)
            with running_daemon() as reuse_daemon, Client(reuse_daemon.socket, timeout=600) as reuse:
                answers: list[str] = []
                for turn, row in zip(range(args.turns), turns):
                    questions = QUESTIONS[: turn + 1]
                    answer, stats, reuse_ms = chat(reuse, questions, answers)
                    if row.reuse and (stats["prompt_tokens"], stats["cached_tokens"]) != (row.prompt_tokens, row.restored):
                        raise RuntimeError(f"turn {turn + 1} differs between runs: {stats} (greedy answers must repeat)")
                    row.prompt_tokens, row.restored = stats["prompt_tokens"], stats["cached_tokens"]
                    row.reuse.append(reuse_ms)
                    row.cold.append(cold.generate(messages=messages(questions, answers), max_tokens=1, temperature=0,
                                                  no_cache=True).wait().client_ttft_ms)
                    row.restore.append(row.restored * kv_bytes / bandwidth / 1e6)
                    prefill_ms, step_ms = prefill_and_step_ms(backend, backend.render(messages(questions, answers)), row.restored)
                    row.prefill.append(prefill_ms)
                    row.step.append(step_ms)
                    answers.append(answer)
                kept = reuse.status()["caches"]["conversations"]

    print(f"client-side TTFT through the socket, {args.runs} runs of the chat (min/median/max); greedy answers of up to "
          f"{ANSWER_TOKENS} tokens; probe bandwidth {spread(bandwidths, '.1f')} GB/s; KV {kv_bytes} bytes per token\n")
    print("| turn | prompt tokens | restored | cold (no_cache) ms | reuse ms | limit ms = restore + prefill new + 1 step "
          "| cold / reuse | **reuse / limit** | reuse / compute (no restore) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for turn, row in enumerate(turns, 1):
        limits = row.limits()
        computes = [p + s for p, s in zip(row.prefill, row.step)]
        print(f"| {turn} | {row.prompt_tokens} | {row.restored} | {spread(row.cold)} | {spread(row.reuse)} | "
              f"{spread(limits)} = {statistics.median(row.restore):.1f} + {statistics.median(row.prefill):.0f} + "
              f"{statistics.median(row.step):.0f} | {spread([c / r for c, r in zip(row.cold, row.reuse)], '.1f')}x | "
              f"**{spread([r / lim for r, lim in zip(row.reuse, limits)], '.2f')}x** | "
              f"{spread([r / c for r, c in zip(row.reuse, computes)], '.2f')}x |")
    print(f"\nkept after the chat: {kept['kept']} state(s), {kept['tokens']} tokens, {kept['bytes'] / 2**20:.1f} MiB: "
          f"{kept['bytes'] // max(kept['tokens'], 1)} bytes per kept token; {kept['hits']} reused, {kept['evictions']} evicted")

    if args.plot:
        series = (("cold (no_cache)", "o-", lambda r: r.cold), ("reuse", "^-", lambda r: r.reuse),
                  ("limit: restore + new tokens + 1 step", "k--", Turn.limits))
        line_plot(args.plot, list(range(1, len(turns) + 1)),
                  [(label, style, [statistics.median(get(r)) for r in turns]) for label, style, get in series],
                  "turn of the chat", "time to first token (ms)")

    # Two conversations taking turns on one daemon.
    with running_daemon() as daemon, Client(daemon.socket, timeout=600) as client:
        said: dict[str, list[str]] = {"a": [], "b": []}
        print("\n| turn | conversation | prompt tokens | restored | TTFT |")
        print("|---:|:---:|---:|---:|---:|")
        for turn in range(len(OTHER)):
            for name, questions in (("a", QUESTIONS), ("b", OTHER)):
                answer, stats, ms = chat(client, questions[: turn + 1], said[name])
                said[name].append(answer)
                print(f"| {turn + 1} | {name} | {stats['prompt_tokens']} | {stats['cached_tokens']} | {ms:.0f} ms |")
        kept = client.status()["caches"]["conversations"]
        print(f"\nkept: {kept['kept']} states, {kept['tokens']} tokens, {kept['bytes'] / 2**20:.1f} MiB; {kept['hits']} reused, {kept['evictions']} evicted")


if __name__ == "__main__":
    main()
