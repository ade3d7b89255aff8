"""Where a decode step's time goes, phase by phase, and how near the step is to memory's limit.

Builds forward.c, as the daemon does (``kernels.compile_flags``) and with
-DRKLLMD_PHASE_TIMES, into bench/decode_phases.c: a random model of SmolLM2-135M's shapes
in 2 MB pages, each --context prefilled, then --steps decode steps timed per phase (each
layer's q/k/v, attention, merge of its chunks, output, gate/up and down products, then the
head), and a read probe of the same weights in the same pages, in a step's order. Prints,
per build and context, min/median/max over --runs:
- the step (median of its steps) and each kind of phase: ms a step, its share, and the
  GB/s it reads (products: their weights; attention: the keys and values of its chunks);
- the probe's GB/s; the weights-only bound (weights / probe) against the step: the ratio
  bench/decode_profile.py measures through the daemon, here for the C step alone; and the
  bound counting the keys and values too, against the step.
The probe reads anonymous 2 MB pages here: read_limit.py's figure over a kept weights file
(its own mapping) can differ by a few GB/s on the same machine.
Run: python bench/decode_phases.py [--march native haswell] [--context 60 500 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_sets import cpu_features  # noqa: E402

from rkllmd.backends.cpu import kernels  # noqa: E402

DRIVER = Path(__file__).with_name("decode_phases.c")
PROBE = Path(__file__).with_name("read_limit.c")
PRODUCTS = ("qkv", "wo", "gu", "wd", "head")
KINDS = ("qkv", "attend", "merge", "wo", "gu", "wd", "head", "embed")


def build(march: str, dest: Path) -> Path:
    cc = kernels.compiler()
    if cc is None:
        sys.exit("no C compiler found (set CC, or install gcc)")
    subprocess.run([cc, *kernels.compile_flags(march), "-DRKLLMD_PHASE_TIMES", f'-DFORWARD_C="{kernels.SOURCE}"',
                    str(DRIVER), str(PROBE), "-o", str(dest), "-lm"], check=True)
    return dest


def run(binary: Path, context: int, steps: int) -> dict[str, float]:
    out = subprocess.run([str(binary), str(context), str(steps)], capture_output=True, text=True, check=True).stdout
    return {key: float(value) for key, value in (pair.split("=") for pair in out.split())}


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def table(runs: list[dict[str, float]]) -> list[str]:
    rows = ["| figure | min/median/max |", "|---|---:|"]
    rows.append(f"| step (median of its steps) | {spread([r['step'] * 1e3 for r in runs])} ms |")
    for kind in KINDS:
        ms = [r[kind] * 1e3 for r in runs]
        share = [r[kind] / r["step"] * 100 for r in runs]
        if kind in PRODUCTS:
            read = f", {spread([r['bytes_' + kind] / r[kind] / 1e9 for r in runs], '{:.1f}')} GB/s of its weights"
        elif kind == "attend":
            read = f", {spread([r['kv'] / r[kind] / 1e9 for r in runs], '{:.1f}')} GB/s of {runs[0]['kv'] / 1e6:.1f} MB keys and values"
        else:
            read = ""
        rows.append(f"| {kind} | {spread(ms, '{:.3f}')} ms, {spread(share, '{:.1f}')} %{read} |")
    rows.append(f"| probe: the weights read in a step's order, best of 1-12 streams a thread | {spread([r['probe'] for r in runs], '{:.1f}')} GB/s |")
    bound = [r["weights"] / (r["probe"] * 1e9) / r["step"] for r in runs]
    with_kv = [(r["weights"] + r["kv"]) / (r["probe"] * 1e9) / r["step"] for r in runs]
    rows.append(f"| **C step / weights-only bound** (weights / probe) | **{spread(bound)}** |")
    rows.append(f"| C step / bound counting keys and values | {spread(with_kv)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--march", nargs="+", default=["native", "haswell"])
    parser.add_argument("--context", nargs="+", type=int, default=[60, 500, 2000])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {cpu_features()}; {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        binaries = {march: build(march, Path(folder) / f"phases-{march}") for march in args.march}
        for context in args.context:
            runs: dict[str, list[dict[str, float]]] = {march: [] for march in args.march}
            for _ in range(args.runs):  # the builds in turn, so both see the same machine
                for march, binary in binaries.items():
                    runs[march].append(run(binary, context, args.steps))
            for march in args.march:
                print(f"\n### -march={march}, decode after {context} tokens ({args.steps} steps a run, {args.runs} runs)\n")
                print("\n".join(table(runs[march])))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
