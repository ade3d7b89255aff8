"""How long ``rkllmctl --help`` (or any rkllmctl command line) takes to start, and what it imports.

    python bench/cli_startup.py                                  # rkllmctl --help, 30 runs
    python bench/cli_startup.py --runs 50 -- generate --help
    python bench/cli_startup.py --against ../main                # this tree and another checkout, side by side

Runs ``python -m rkllmctl ARGS`` from this tree (and, with ``--against``, from another
checkout, its runs interleaved with these so both see the same load) and prints the
fastest and the median wall time and CPU time (user + system) per run: on a busy machine
the fastest run and the CPU time say more than the median. Then the modules of rkllmd,
rkllmctl and the heavier libraries the command line imported (``-X importtime``), slowest
first.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("jinja2", "zmq", "msgpack", "numpy", "aiohttp", "shtab", "argparse_manpage", "rkllmd.templates", "rkllmd.config", "asyncio")


class Tree:
    """``python -m rkllmctl`` run from one checkout (its code first on the path)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PYTHONPATH": str(root)}

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rkllmctl", *args], cwd=self.root, env=kw.pop("env", self.env), **kw)

    def timed(self, args: list[str]) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one run."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        self.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def imports(self, args: list[str]) -> list[tuple[str, int]]:
        """(module, cumulative µs) of the notable modules the command line imported."""
        run = self.run(args, capture_output=True, text=True, env={**self.env, "PYTHONPROFILEIMPORTTIME": "1"})
        found = {}
        for line in run.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
            if m and (m.group(3).startswith(("rkllmd", "rkllmctl")) or m.group(3) in HEAVY):
                found[m.group(3)] = int(m.group(1))
        return sorted(found.items(), key=lambda kv: -kv[1])


def summary(name: str, walls: list[float], cpus: list[float]) -> str:
    return (f"{name}: wall fastest {min(walls) * 1000:.0f} ms, median {statistics.median(walls) * 1000:.0f} ms; "
            f"cpu fastest {min(cpus) * 1000:.0f} ms, median {statistics.median(cpus) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--against", type=Path, help="another checkout of rkllmd, measured side by side")
    parser.add_argument("args", nargs="*", default=["--help"], help="rkllmctl's arguments (after --)")
    opts = parser.parse_args()
    trees = {"this tree": Tree(ROOT)}
    if opts.against:
        trees[f"{opts.against}"] = Tree(opts.against.resolve())
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in trees}
    for tree in trees.values():
        tree.timed(opts.args)  # warm the page cache and the bytecode caches
    for _ in range(opts.runs):
        for name, tree in trees.items():
            wall, cpu = tree.timed(opts.args)
            results[name][0].append(wall)
            results[name][1].append(cpu)
    floor = min(time_python() for _ in range(10))
    print(f"python -m rkllmctl {' '.join(opts.args)}: {opts.runs} runs each, load average {os.getloadavg()[0]:.1f}, "
          f"python -c pass {floor * 1000:.0f} ms (the floor)")
    for name, (walls, cpus) in results.items():
        print("  " + summary(name, walls, cpus))
    if opts.against:
        (a_wall, a_cpu), (b_wall, b_cpu) = results.values()
        print(f"  this tree / {opts.against}: wall {min(a_wall) / min(b_wall):.2f}x, cpu {min(a_cpu) / min(b_cpu):.2f}x (fastest runs)")
    for name, tree in trees.items():
        print(f"  imported by {name} (cumulative ms):")
        for module, micros in tree.imports(opts.args):
            print(f"    {module:<40} {micros / 1000:7.1f}")


def time_python() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=False)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
