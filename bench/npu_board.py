#!/usr/bin/env python3
"""Measure the NPU backend on a board: time to first token with and without a prompt
cache for a long (~1000-token) system prompt, and decode speed.

Run it on the board, from a checkout (or with rkllmd installed), with the daemon
stopped (one process owns the NPU):

    python3 bench/npu_board.py --model /var/lib/rkllmd/models/qwen2.5-1.5b.rkllm

and paste the printed markdown into an issue. ``--library`` points at another
librkllmrt.so (the tests run this script against the fake runtime that way).

Three cases, each the same request (system prompt + a short question, greedy):
  no cache                  the whole prompt is prefilled on every request
  prompt cache (first use)  the cache file is loaded, then only the tail is prefilled
  prompt cache (loaded)     the cache is already loaded (the daemon's steady state)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rkllmd.backends.base import GenerationStats, PrefixState, SamplingParams  # noqa: E402
from rkllmd.backends.rkllm.backend import RkllmBackend  # noqa: E402

RULES = (
    "Answer in plain English. Prefer short sentences. Cite the section of the handbook you rely on. "
    "When a question is about safety, say so first. Never guess part numbers; ask for the label. "
    "Units are metric unless the user writes imperial. Dates are ISO 8601. "
)
QUESTION = "Which units should I use?"


def system_prompt(backend: RkllmBackend, tokens: int) -> str:
    """Handbook-like text of about ``tokens`` tokens (by the backend's estimate)."""
    parts = []
    while backend.count_tokens("".join(parts)) < tokens:
        parts.append(f"Rule {len(parts) + 1}. {RULES}")
    return "".join(parts)


def timed(backend: RkllmBackend, prompt: str, params: SamplingParams, prefix: PrefixState | None) -> GenerationStats:
    return backend.generate(prompt, params, prefix, lambda _text: True)


def row(case: str, runs: list[GenerationStats]) -> str:
    ttft = statistics.median(s.ttft_ms for s in runs)
    last = runs[-1]
    decode = statistics.median(s.decode_ms for s in runs)
    speed = f"{last.completion_tokens / decode * 1e3:.1f}" if decode > 0 else "n/a"
    cells = [case, f"{ttft:.0f}", str(last.prompt_tokens - last.cached_tokens), str(last.cached_tokens),
             str(last.completion_tokens), speed]
    return "| " + " | ".join(cells) + " |"


def read(path: str) -> str:
    try:
        return Path(path).read_text().strip("\x00\n ")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help=".rkllm model file")
    parser.add_argument("--library", type=Path, help="librkllmrt.so (default: the usual install locations)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "1.2", "1.3"])
    parser.add_argument("--template", default="qwen2.5-instruct")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--cpu-mask", type=lambda v: int(v, 0), default=0, help="e.g. 0xF0 for the big cores")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="where the prompt cache file goes (default: a temp dir)")
    args = parser.parse_args(argv)

    backend = RkllmBackend(args.model, library=args.library, runtime=args.runtime, template=args.template,
                           context_length=args.context_length, cpu_mask=args.cpu_mask)
    started = time.monotonic()
    backend.load()
    load_s = time.monotonic() - started
    try:
        with tempfile.TemporaryDirectory(prefix="rkllmd-bench-") as scratch:
            workdir = args.workdir or Path(scratch)
            workdir.mkdir(parents=True, exist_ok=True)
            report = measure(backend, args, workdir)
        facts = backend.describe()
    finally:
        backend.close()

    print("## rkllmd NPU benchmark\n")
    print(f"- board: {read('/proc/device-tree/model')}, kernel {platform.release()}, "
          f"NPU driver: {read('/sys/kernel/debug/rknpu/version')}")
    print(f"- runtime: {facts.get('runtime')}, library {facts.get('library')}")
    print(f"- model: {args.model} ({os.path.getsize(args.model) / 2**20:.0f} MiB), loaded in {load_s:.1f} s, "
          f"template {args.template}, context {args.context_length}")
    print(f"- system prompt: {report['prefix_tokens']} tokens (runtime count); question {QUESTION!r}; "
          f"greedy, max {args.max_tokens} tokens; median of {args.runs} runs")
    print(f"- prompt cache build: {report['build_ms']:.0f} ms\n")
    print("| case | TTFT ms | prefilled tokens | cached tokens | completion tokens | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for line in report["rows"]:
        print(line)
    return 0


def measure(backend: RkllmBackend, args: argparse.Namespace, workdir: Path) -> dict:
    system = system_prompt(backend, args.system_tokens)
    prompt = backend.render([{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    uncached = [timed(backend, prompt, params, None) for _ in range(args.runs)]

    prefix_text = backend.template.cacheable_prefix(system)
    started = time.monotonic()
    n_tokens = backend.build_prefix(prefix_text, workdir / "system.tmp")
    build_ms = (time.monotonic() - started) * 1e3
    cache = workdir / "system.bin"
    (workdir / "system.tmp").replace(cache)
    payload, _ = backend.load_prefix(cache, n_tokens)
    prefix = PrefixState("bench", prefix_text, n_tokens, payload)

    first_use = [timed(backend, prompt, params, prefix)]
    loaded = [timed(backend, prompt, params, prefix) for _ in range(args.runs)]
    return {
        "prefix_tokens": n_tokens,
        "build_ms": build_ms,
        "rows": [row("no cache", uncached), row("prompt cache (first use)", first_use),
                 row("prompt cache (loaded)", loaded)],
    }


if __name__ == "__main__":
    sys.exit(main())
