"""The memory-bandwidth limit of a decode step, measured by a STREAM-style C probe.

A decode step streams every weight matrix once (``streamed_bytes``), so tokens/s cannot
exceed bandwidth / those bytes. ``measure`` compiles read_limit.c with the C forward
pass's own flags (``kernels.compile_flags``: the same -march and OpenMP team over all
cores) and reads a buffer of exactly that many bytes with 1..16 streams per thread,
``rounds`` times each, keeping the best: the most this machine's cores reach reading
memory, against which the decode step's tokens/s is a ratio (above 1.0: the probe is
wrong, not the decode). The buffer is anonymous memory in 4 KB pages, as the weights'
file mapping is (no transparent huge pages).
Run alone: python bench/read_limit.py [--megabytes 538] [--march haswell] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rkllmd.backends.cpu import kernels

SOURCE = Path(__file__).with_name("read_limit.c")
MAX_STREAMS = 16
#: Weights that a decode step does not stream (a few KB of norms).
NOT_STREAMED = ("attn_norm", "ffn_norm", "output_norm")


@dataclass
class ReadLimit:
    n_bytes: int
    threads: int
    best_gbps: float  # the best round of the best stream count
    best_streams: int
    gbps_by_streams: dict[int, float]  # the best round of each stream count
    rounds_gbps: list[float]  # every round at the best stream count (for min/median/max)

    def tokens_per_s(self) -> float:
        """The decode rate that reading ``n_bytes`` a token at the best bandwidth allows."""
        return self.best_gbps * 1e9 / self.n_bytes

    def describe(self) -> str:
        r = self.rounds_gbps
        return (f"{self.n_bytes / 1e6:.1f} MB read by {self.threads} threads: best {self.best_gbps:.2f} GB/s "
                f"({self.best_streams} streams per thread; that count's rounds min/median/max "
                f"{min(r):.2f}/{statistics.median(r):.2f}/{max(r):.2f} GB/s) = at most {self.tokens_per_s():.1f} tokens/s")


def streamed_bytes(weights) -> int:
    """Bytes of weights a decode step reads, as the C forward pass stores them (panels, padding included)."""
    return sum(a.nbytes for name, a in weights.arrays().items() if name not in NOT_STREAMED)


def _build(march: str, folder: Path) -> ctypes.CDLL:
    cc = kernels.compiler()
    if cc is None:
        raise SystemExit("no C compiler (set CC, or install gcc)")
    library = folder / "read_limit.so"
    subprocess.run([cc, *kernels.compile_flags(march), "-shared", "-fPIC", "-o", str(library), str(SOURCE)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.rkllmd_read_seconds.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    lib.rkllmd_read_seconds.restype = ctypes.c_double
    return lib


def measure(n_bytes: int, march: str = kernels.NATIVE, rounds: int = 5) -> ReadLimit:
    """The best read bandwidth over 1..16 streams per thread, each stream count ``rounds`` times, interleaved."""
    with tempfile.TemporaryDirectory(prefix="rkllmd-read-limit-") as folder:
        lib = _build(march, Path(folder))
        threads = ctypes.CDLL(str(Path(folder) / "read_limit.so")).rkllmd_read_threads()
        region = mmap.mmap(-1, n_bytes)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            region.madvise(mmap.MADV_NOHUGEPAGE)
        buffer = np.frombuffer(region, np.float32, count=n_bytes // 4)
        buffer[:] = 1.0  # every page mapped and holding data
        sink = np.zeros(threads, np.float64)
        rounds_by_streams: dict[int, list[float]] = {s: [] for s in range(1, MAX_STREAMS + 1)}
        lib.rkllmd_read_seconds(buffer.ctypes.data, buffer.size, 4, sink.ctypes.data)  # warm-up
        for _ in range(rounds):
            for streams in rounds_by_streams:
                seconds = lib.rkllmd_read_seconds(buffer.ctypes.data, buffer.size, streams, sink.ctypes.data)
                rounds_by_streams[streams].append(buffer.nbytes / seconds / 1e9)
        if float(sink.sum()) != float(buffer.size):  # every float read once (1.0 each)
            raise RuntimeError(f"the probe read {sink.sum()} floats' worth, not {buffer.size}")
        del buffer
        region.close()
    best = {s: max(r) for s, r in rounds_by_streams.items()}
    best_streams = max(best, key=best.get)
    return ReadLimit(n_bytes - n_bytes % 4, threads, best[best_streams], best_streams, best, rounds_by_streams[best_streams])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=538.0)
    parser.add_argument("--march", default=kernels.NATIVE)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    limit = measure(int(args.megabytes * 1e6), args.march, args.rounds)
    print(limit.describe())
    print("| streams per thread | best GB/s |\n|---:|---:|")
    for streams, gbps in limit.gbps_by_streams.items():
        print(f"| {streams} | {gbps:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
