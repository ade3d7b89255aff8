"""How long the CPU backend's tokenizer takes on long texts, and how long it keeps other
threads waiting meanwhile.

A request may carry ``daemon.max_prompt_chars`` (262,144) characters; the daemon tokenizes
it on the model worker's prompt thread while the socket loop answers other clients. For
texts of one size and several shapes (prose; runs that make one long piece each: distinct
CJK characters, one word of random letters, punctuation, spaces) it prints the time to
tokenize, as a multiple of prose's, and the longest a thread sleeping 1 ms at a time waited
meanwhile (what a ping waits for the GIL), next to the same sleeper's longest wait with the
tokenizer idle, in the same run.

    .venv/bin/python bench/tokenize_long.py [--chars 250000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import string
import threading
import time
from pathlib import Path

from rkllmd.backends.cpu.backend import bundled_model_path
from rkllmd.backends.cpu.gguf import GGUFFile
from rkllmd.backends.cpu.tokenizer import Tokenizer


def shapes(chars: int) -> dict[str, str]:
    rng = random.Random(1)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return {
        "prose (README.md)": (readme * (chars // len(readme) + 1))[:chars],
        "distinct CJK characters": "".join(chr(0x4E00 + i * 7919 % 20_000) for i in range(chars)),
        "one word of random letters": "".join(rng.choice(string.ascii_lowercase) for _ in range(chars)),
        "punctuation": "".join(rng.choice("!?.,;:-()[]{}<>/*&^%$#@") for _ in range(chars)),
        "spaces": " " * chars,
    }


class Sleeper:
    """A thread sleeping 1 ms at a time; ``longest`` is the longest it waited for the GIL and
    the CPU, past its millisecond."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            self.longest = max(self.longest, time.perf_counter() - started - 0.001)

    def __enter__(self) -> Sleeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=250_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(bundled_model_path()).metadata)
    rows = []
    for name, text in shapes(args.chars).items():
        best, longest, tokens = float("inf"), 0.0, 0
        for _ in range(args.repeat):
            tokenizer._bpe_cached.cache_clear()  # every run from a cold cache of merges
            with Sleeper() as sleeper:
                started = time.perf_counter()
                tokens = len(tokenizer.encode(text))
                best = min(best, time.perf_counter() - started)
            longest = max(longest, sleeper.longest)
        with Sleeper() as idle:
            time.sleep(best)
        rows.append((name, tokens, best, longest, idle.longest))
    prose = rows[0][2]
    print(f"{args.chars:,} characters, best of {args.repeat}; waits of a thread sleeping 1 ms at a time\n")
    print("| text | tokens | seconds | x prose | longest wait, tokenizing | longest wait, idle |")
    print("|---|---|---|---|---|---|")
    for name, tokens, seconds, longest, idle in rows:
        print(f"| {name} | {tokens:,} | {seconds:.2f} | {seconds / prose:.1f} | {longest * 1000:.0f} ms | {idle * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
