"""Constrained decoding against unconstrained, side by side in one run, on the CPU backend.

Each run decodes the same prompt greedily, once free and once under a JSON Schema (its
tokens masked by llguidance, the next mask computed on a helper thread while the forward
pass runs), the two interleaved so that whatever else the machine does weighs on both
alike; then four streams decoded together, each under another constraint, against four
free ones. Printed: decode tokens/s over the steps where every stream decodes (min /
median / max over the runs), the ratio of the medians, and the mask's own time per token
next to what the sampler still waited for it (the part the overlap did not hide).

Run: python bench/constrained_decode.py [--runs 7] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR  # noqa: E402

from rkllmd.sampling import SamplingParams  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402
from rkllmd.constraints import from_request  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to cook, as a JSON object with a title and the story."
#: A document that may run long (the story), so both cases decode the same number of tokens.
STORY = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string"}},
         "required": ["title", "story"], "additionalProperties": False}
#: The four streams decoded together: each under another constraint.
BATCH = [
    {"format": STORY},
    {"format": "json"},
    {"format": {"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "string"}}}, "required": ["lines"]}},
    {"grammar": 'start: "Once upon a time" /[a-zA-Z ,.\\n]+/'},
]


def decode(backend: CpuBackend, requests: list[SamplingParams]) -> tuple[list, float]:
    """Start ``requests`` together and step them to the end: their runs, and the decode
    tokens/s while all of them were decoding (streams x steps / the steps' time: a stream
    that ends early, as a completed document does, does not shrink the batch measured)."""
    prompt = backend.render([{"role": "user", "content": PROMPT}])
    runs = [backend.start(prompt, params, None, lambda text: True) for params in requests]
    steps: list[float] = []
    while not all(run.done for run in runs):
        full = all(run.phase == "decode" and not run.done for run in runs)
        started = time.perf_counter()
        backend.step([run for run in runs if not run.done])
        if full and not any(run.done for run in runs):
            steps.append(time.perf_counter() - started)
    for run in runs:
        backend.release(run)
    return runs, len(runs) * len(steps) / sum(steps)


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    free = SamplingParams(max_tokens=args.tokens)
    story = SamplingParams(max_tokens=args.tokens, constraint=from_request(format=STORY))
    batch_free = [SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=i) for i in range(len(BATCH))]
    batch_constrained = [SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=i, constraint=from_request(**c)) for i, c in enumerate(BATCH)]
    decode(backend, [free])  # warm-up: pages the weights in, builds the vocabulary
    decode(backend, [story])

    single: dict[str, list[float]] = {"free": [], "constrained": []}
    batched: dict[str, list[float]] = {"free": [], "constrained": []}
    mask_us, wait_us, tokens = [], [], set()
    load_before = os.getloadavg()
    started = time.monotonic()
    for _ in range(args.runs):
        _, rate = decode(backend, [free])
        single["free"].append(rate)
        [run], rate = decode(backend, [story])
        single["constrained"].append(rate)
        guide = run.sampler.guide
        mask_us.append(guide.mask_s / guide.masks * 1e6)
        wait_us.append(guide.wait_s / run.stats.completion_tokens * 1e6)
        tokens.add(run.stats.completion_tokens)
        for case, requests in (("free", batch_free), ("constrained", batch_constrained)):
            batched[case].append(decode(backend, requests)[1])
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    kernel = backend.describe()["decode"]
    backend.close()

    ratio = statistics.median(single["constrained"]) / statistics.median(single["free"])
    batch_ratio = statistics.median(batched["constrained"]) / statistics.median(batched["free"])
    print(f"CPU backend, {kernel}; {args.runs} runs of {args.tokens} tokens in {elapsed:.0f} s; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (other work on the machine weighs on both cases)")
    print()
    print("| case | decode tokens/s min / median / max | constrained / free (medians) | mask µs/token (helper thread) | waited for it µs/token |")
    print("|---|---|---|---|---|")
    print(f"| 1 stream, free | {spread(single['free'])} | | | |")
    print(f"| 1 stream, JSON Schema ({'/'.join(map(str, sorted(tokens)))} tokens) | {spread(single['constrained'])} | {ratio:.3f} | "
          f"{statistics.median(mask_us):.0f} | {statistics.median(wait_us):.0f} |")
    print(f"| 4 streams together, free (tokens/s of the 4) | {spread(batched['free'])} | | | |")
    print(f"| 4 streams together, each its own constraint | {spread(batched['constrained'])} | {batch_ratio:.3f} | | |")


if __name__ == "__main__":
    main()
