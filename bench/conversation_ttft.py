"""Conversations reusing their own state: time to first token per turn of a 10-turn chat.

In one run, side by side, for every turn of a chat with a ~440-token system prompt (the
issue's case) whose history grows by each answer:
- cold: a daemon asked with `no_cache` prefills the whole conversation;
- reuse: a daemon that keeps each turn's state restores the longest common token prefix;
- limit: in process, prefilling only the tokens reuse did not restore (at their
  positions, after the rest) plus one decode step: the issue's goal is reuse within 1.3x.
Then: bytes of memory per kept token (status), and two conversations taking turns on one
daemon (each turn restores its own conversation's state, not the other's).
Run: python bench/conversation_ttft.py [--turns 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR, running_daemon, words  # noqa: E402
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


def limit_ms(backend: CpuBackend, prompt: str, restored: int, repeat: int) -> float:
    """Prefill of the tokens after ``restored`` at their positions, then one decode step."""
    ids = backend.tokenizer.encode(prompt)
    model = backend.model
    slot = model.new_slot()
    if restored:
        model.prefill(slot, ids[:restored], 0)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        logits = model.prefill(slot, ids[restored:], restored)
        model.decode(slot, int(logits.argmax()), len(ids))
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def chat(client: Client, questions: list[str], answers: list[str], **fields) -> tuple[str, dict, float]:
    result = client.generate(messages=messages(questions, answers), max_tokens=ANSWER_TOKENS, **fields).wait()
    return result.text, result.stats, result.client_ttft_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    parser.add_argument("--repeat", type=int, default=3, help="runs of the cold prompt and of the limit (medians)")
    parser.add_argument("--plot", type=Path, help="write a PNG of each turn's TTFT, cold, with reuse and the limit")
    args = parser.parse_args()

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    rows = []
    with running_daemon() as reuse_daemon, running_daemon() as cold_daemon:
        with Client(reuse_daemon.socket, timeout=600) as reuse, Client(cold_daemon.socket, timeout=600) as cold:
            answers: list[str] = []
            for turn in range(args.turns):
                questions = QUESTIONS[: turn + 1]
                answer, stats, reuse_ms = chat(reuse, questions, answers)
                cold_ms = statistics.median(
                    cold.generate(messages=messages(questions, answers), max_tokens=1, no_cache=True).wait().client_ttft_ms
                    for _ in range(args.repeat)
                )
                prompt = backend.render(messages(questions, answers))
                rows.append((turn + 1, stats["prompt_tokens"], stats["cached_tokens"], cold_ms, reuse_ms,
                             limit_ms(backend, prompt, stats["cached_tokens"], args.repeat)))
                answers.append(answer)
            kept = reuse.status()["caches"]["conversations"]

    print(f"client-side TTFT through the socket; cold and limit: median of {args.repeat}; answers of up to {ANSWER_TOKENS} tokens\n")
    print("| turn | prompt tokens | restored | cold (no_cache) | reuse | limit | cold / reuse | reuse / limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for turn, prompt_tokens, cached, cold_ms, reuse_ms, lim in rows:
        print(f"| {turn} | {prompt_tokens} | {cached} | {cold_ms:.0f} ms | {reuse_ms:.0f} ms | {lim:.0f} ms | "
              f"{cold_ms / reuse_ms:.1f}x | {reuse_ms / lim:.2f}x |")
    print(f"\nkept after the chat: {kept['kept']} state(s), {kept['tokens']} tokens, {kept['bytes'] / 2**20:.1f} MiB: "
          f"{kept['bytes'] // max(kept['tokens'], 1)} bytes per kept token; {kept['hits']} reused, {kept['evictions']} evicted")

    if args.plot:
        columns = ((3, "cold (no_cache)", "o-"), (4, "reuse", "^-"), (5, "limit: new tokens + 1 step", "k--"))
        line_plot(args.plot, [r[0] for r in rows], [(label, style, [r[c] for r in rows]) for c, label, style in columns],
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
