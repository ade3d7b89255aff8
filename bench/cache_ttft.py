"""Prompt caches: time to first token cold vs cached (from memory, from disk), against the limit.

For system prompts of about 250, 500, 1,000 and 2,000 tokens, in one run:
- cold: `no_cache` — the whole prompt is prefilled;
- disk: the binary cache is read from disk (a daemon whose memory budget is 0);
- memory: the cache is already in the daemon's LRU;
- limit: prefill of the user's own message alone plus one decode step, measured in-process.
Also: time from an editor's save to the binary cache being ready, and bytes per token.
Run: python bench/cache_ttft.py [--plot docs/cache_ttft.png]
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

QUESTION = "In one sentence, what does this project do?"


def ttft(client: Client, repeat: int, **kwargs) -> tuple[float, int]:
    """Median client-side TTFT (ms) and the cached token count of the last run."""
    times, cached = [], 0
    for _ in range(repeat):
        result = client.generate(QUESTION, max_tokens=1, **kwargs).wait()
        times.append(result.client_ttft_ms)
        cached = result.stats["cached_tokens"]
    return statistics.median(times), cached


def limit_ms(backend: CpuBackend, system: str, repeat: int) -> float:
    """Prefill of the tokens after the cached prefix, then one decode step, in-process."""
    prompt = backend.render([{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])
    prefix = backend.render([{"role": "system", "content": system}], add_generation_prompt=False)
    tokenizer, model = backend.tokenizer, backend.model
    slot = model.new_slot()
    suffix = tokenizer.encode(prompt)[len(tokenizer.encode(prefix)):]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        logits = model.prefill(slot, suffix, 0)
        model.decode(slot, int(logits.argmax()), len(suffix))
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plot", type=Path, help="write a PNG of TTFT against system-prompt length")
    args = parser.parse_args()

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    systems = {n: "You are the assistant of a small team. Project context follows. " + words(n) for n in args.sizes}
    rows = []
    with running_daemon() as memory_daemon, running_daemon(env={"RKLLMD_CACHE_MEMORY_BUDGET_MB": "0"}) as disk_daemon:
        text_mem, text_disk = memory_daemon.text_dir, disk_daemon.text_dir
        with Client(memory_daemon.socket, timeout=120) as mem, Client(disk_daemon.socket, timeout=120) as disk:
            save_to_ready = []
            for n, system in systems.items():
                for client, folder in ((mem, text_mem), (disk, text_disk)):
                    saved = time.perf_counter()
                    (folder / f"s{n}.txt").write_text(system)  # as an editor saves it
                    time.sleep(0.05)
                    info = client.cache_wait(f"s{n}", timeout=600)
                    if client is mem:
                        save_to_ready.append((info["tokens"], (time.perf_counter() - saved) * 1000, info["binary_bytes"] / info["tokens"]))
                cold, _ = ttft(mem, args.repeat, system=system, no_cache=True)
                ttft(mem, 1, system=system)  # bring it into memory
                hot, cached = ttft(mem, args.repeat, system=system)
                from_disk, cached_disk = ttft(disk, args.repeat, system=system)
                assert cached == cached_disk > 0
                rows.append((n, cached, cold, from_disk, hot, limit_ms(backend, system, args.repeat)))

    print(f"median of {args.repeat} runs; client-side TTFT through the socket; 1 token generated\n")
    print("| system prompt tokens | cold | from disk | from memory | limit | cold / memory | memory / limit | disk / limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, cached, cold, disk_ms, hot, lim in rows:
        print(f"| {cached} | {cold:.0f} ms | {disk_ms:.0f} ms | {hot:.0f} ms | {lim:.0f} ms | {cold / hot:.1f}x | {hot / lim:.2f}x | {disk_ms / lim:.2f}x |")
    print("\n| cache tokens | save to ready | binary bytes per token |")
    print("|---:|---:|---:|")
    for tokens, ms, per in save_to_ready:
        print(f"| {tokens} | {ms:.0f} ms | {per:.0f} |")

    if args.plot:
        columns = ((2, "cold (full prefill)", "o-"), (3, "cached, from disk", "s-"), (4, "cached, from memory", "^-"), (5, "limit: user message + 1 step", "k--"))
        line_plot(args.plot, [r[1] for r in rows], [(label, style, [r[c] for r in rows]) for c, label, style in columns],
                  "system prompt tokens", "time to first token (ms)")


if __name__ == "__main__":
    main()
