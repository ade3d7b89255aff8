"""CPU backend speed: prefill and decode tokens/s by prompt length, and start-up time
(the first start, which dequantizes the weights and compiles the decode step, and later
ones, which map and load them).

Run: python bench/cpu_backend.py   (prints a markdown table for docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, WEIGHTS_DIR, running_daemon, words  # noqa: E402

from rkllmd.sampling import SamplingParams  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 1500])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    load_s = time.perf_counter() - t0
    weights_source = backend.describe()["weights"]
    rows = []
    for n in args.lengths:
        prompt = backend.render([{"role": "user", "content": "Continue this text forever: " + words(n)}])
        prefill, decode, tokens = [], [], 0
        for _ in range(args.repeat):
            stats = backend.generate(prompt, SamplingParams(max_tokens=args.decode_tokens), None, lambda s: True)
            prefill.append(stats.prompt_tokens / (stats.prefill_ms / 1000))
            if stats.completion_tokens > 1:
                decode.append((stats.completion_tokens - 1) / (stats.decode_ms / 1000))
            tokens = stats.prompt_tokens
        rows.append((tokens, statistics.median(prefill), statistics.median(decode) if decode else float("nan")))
    backend.close()

    # Start-up: the first start ever dequantizes and keeps the weights and compiles the
    # decode step; later ones map and load them.
    with tempfile.TemporaryDirectory(prefix="rkb-builds-") as fresh:
        env = {"RKLLMD_MODEL_WEIGHTS_DIR": f"{fresh}/weights", "RKLLMD_MODEL_KERNELS_DIR": f"{fresh}/kernels"}
        with running_daemon(env=env) as daemon:
            first = daemon.ready_s
        starts = []
        for _ in range(args.repeat):
            with running_daemon(env=env) as daemon:
                starts.append(daemon.ready_s)

    print(f"model load in-process: {load_s:.2f} s (weights {weights_source})\n")
    print("| daemon spawn to first answered request | seconds |")
    print("|---|---:|")
    print(f"| first start (dequantize and keep the weights, compile the decode step) | {first:.2f} |")
    print(f"| later starts (map the weights, load the decode step), median of {args.repeat} | {statistics.median(starts):.2f} "
          f"(min {min(starts):.2f}, max {max(starts):.2f}) |\n")
    print("| prompt tokens | prefill tokens/s | decode tokens/s |")
    print("|---:|---:|---:|")
    for tokens, p, d in rows:
        print(f"| {tokens} | {p:.0f} | {d:.1f} |")


if __name__ == "__main__":
    main()
