"""Two versions of the C forward pass (forward.c) side by side: this tree's and another
git revision's, each built for every --march, run in turn in rounds on a random model of
SmolLM2-135M's shapes (bench/forward_timing.c).

Prints, per build and version, best of the rounds:
- prefill CPU time a token with one thread: the work a version does, which other
  processes on the machine disturb far less than they disturb wall time;
- prefill tokens/s with every core (wall) and the CPU time a token it took (the excess
  over one thread is the threads' waiting);
- a decode step with every core (median of --decode-steps);
and whether both versions, and one thread against all, give the same logits bits.
The load average before and after says how quiet the machine was.
Run: python bench/forward_versions.py [--against main] [--march native haswell] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import ROOT  # noqa: E402
from kernel_sets import cpu_features  # noqa: E402

from rkllmd.backends.cpu import kernels  # noqa: E402

TIMING = Path(__file__).with_name("forward_timing.c")


def build(source: Path, march: str, dest: Path) -> Path:
    cc = kernels.compiler()
    if cc is None:
        sys.exit("no C compiler found (set CC, or install gcc)")
    subprocess.run([cc, *kernels.compile_flags(march), f'-DFORWARD_C="{source}"', str(TIMING), "-o", str(dest), "-lm"],
                   check=True)
    return dest


def measure(binary: Path, threads: int, *args: object) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([str(binary), *map(str, args)], env=env, capture_output=True, text=True, check=True).stdout
    return dict(pair.split("=") for pair in out.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="main", help="git revision of the other version (default: main)")
    parser.add_argument("--march", nargs="+", default=["native", "haswell"])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    relative = kernels.SOURCE.relative_to(ROOT)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rkllmd-forward-") as scratch:
        other = Path(scratch) / "forward.c"
        other.write_bytes(subprocess.run(["git", "show", f"{args.against}:{relative}"], cwd=ROOT, capture_output=True,
                                         check=True).stdout)
        versions = {args.against: other, "this tree": kernels.SOURCE}
        binaries = {(v, march): build(source, march, Path(scratch) / f"{i}-{march}")
                    for i, (v, source) in enumerate(versions.items()) for march in args.march}
        runs: dict[tuple[str, str], list[dict[str, str]]] = {key: [] for key in binaries}
        for _ in range(args.rounds):  # in turn, so a disturbance hits both versions
            for key, binary in binaries.items():
                one = measure(binary, 1, "prefill", args.tokens, args.chunk, 1)
                team = measure(binary, cores, "prefill", args.tokens, args.chunk, 1)
                step = measure(binary, cores, "decode", args.tokens, args.decode_steps)
                runs[key].append({"cpu1": one["cpu"], "wall": team["wall"], "cpu": team["cpu"], "step": step["step"],
                                  "hashes": f"{one['hash']} {team['hash']}"})
    print(f"CPU: {cpu_features()}; {cores} cores; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"prefill of {args.tokens} tokens in chunks of {args.chunk}; best of {args.rounds} rounds, "
          f"versions in turn; {cores} threads but where it says one\n")
    print(f"| build | version | prefill, one thread: ms CPU a token | prefill tokens/s | its ms CPU a token "
          f"| decode step ms |")
    print("|---|---|---:|---:|---:|---:|")
    hashes = set()
    for march in args.march:
        best = {}
        for version in versions:
            results = runs[(version, march)]
            best[version] = {key: min(float(r[key]) for r in results) for key in ("cpu1", "wall", "cpu", "step")}
            hashes |= {h for r in results for h in r["hashes"].split()}
            b = best[version]
            print(f"| -march={march} | {version} | {b['cpu1'] * 1000 / args.tokens:.2f} | {args.tokens / b['wall']:.0f} "
                  f"| {b['cpu'] * 1000 / args.tokens:.2f} | {b['step'] * 1000:.2f} |")
        old, new = best[args.against], best["this tree"]
        print(f"| -march={march} | **ratio** | **{old['cpu1'] / new['cpu1']:.2f}x** | **{old['wall'] / new['wall']:.2f}x** "
              f"| | **{old['step'] / new['step']:.2f}x** |")
    print(f"\nlogits bits: {'the same' if len(hashes) == 1 else 'DIFFERENT'} across versions, builds and thread counts "
          f"({', '.join(sorted(hashes))})")


if __name__ == "__main__":
    main()
