"""How long ``rkllmctl --help`` (or any rkllmctl command line) takes to start, and what it imports.

    python bench/cli_startup.py                        # rkllmctl --help, 30 runs
    python bench/cli_startup.py --runs 50 -- generate --help

Runs the command line as a shell runs it (the venv's ``rkllmctl`` script beside this
Python, else ``python -m rkllmctl``) and prints the fastest and the median wall time and
the CPU time (user + system) per run: on a busy machine the fastest run and the CPU time
say more than the median. Then the modules of rkllmd, rkllmctl and the heavier libraries
the command line imported (``-X importtime``), slowest first.
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

HEAVY = ("jinja2", "zmq", "msgpack", "numpy", "aiohttp", "shtab", "argparse_manpage", "rkllmd.templates", "rkllmd.config", "asyncio")


def command(args: list[str]) -> list[str]:
    script = Path(sys.executable).with_name("rkllmctl")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "rkllmctl", *args]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imports(cmd: list[str]) -> list[tuple[str, int]]:
    """(module, cumulative µs) of the notable modules the command line imported."""
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    found = {}
    for line in run.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and (m.group(3).startswith(("rkllmd", "rkllmctl")) or m.group(3) in HEAVY):
            found[m.group(3)] = int(m.group(1))
    return sorted(found.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("args", nargs="*", default=["--help"], help="rkllmctl's arguments (after --)")
    opts = parser.parse_args()
    cmd = command(opts.args)
    timed(cmd)  # warm the page cache and the bytecode caches
    walls, cpus = zip(*(timed(cmd) for _ in range(opts.runs)))
    print(f"{' '.join(cmd)}: {opts.runs} runs, load average {os.getloadavg()[0]:.1f}")
    print(f"  wall: fastest {min(walls) * 1000:.0f} ms, median {statistics.median(walls) * 1000:.0f} ms")
    print(f"  cpu:  fastest {min(cpus) * 1000:.0f} ms, median {statistics.median(cpus) * 1000:.0f} ms")
    print(f"  python -c pass: fastest {min(timed([sys.executable, '-c', 'pass'])[0] for _ in range(10)) * 1000:.0f} ms (the floor)")
    print("  imported (cumulative ms):")
    for name, micros in imports(cmd):
        print(f"    {name:<40} {micros / 1000:7.1f}")


if __name__ == "__main__":
    main()
