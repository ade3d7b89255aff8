"""The memory-bandwidth limit of a decode step, measured by a STREAM-style C probe.

A decode step streams every weight matrix once (``streamed_bytes``), so tokens/s cannot
exceed bandwidth / those bytes. ``measure`` compiles read_limit.c with the C forward
pass's own flags (``kernels.compile_flags``: the same -march and OpenMP team over all
cores, and one thread, as forward.c's decode on a busy machine) and reads that many
bytes with 1..16 streams per thread, ``rounds`` times each, keeping the best: the most
this machine's cores reach reading memory, against which the
decode step's tokens/s is a ratio (above 1.0: the probe is wrong, not the decode).
Given the model's weights (``weights=``) in one region (a kept weights file, read into 2 MB
pages or mapped), it reads their own memory, the very pages a decode step reads: in 2 MB
pages, or in a mapped file's pages (2 MB where the page cache holds such folios,
/proc/self/smaps FilePmdMapped), which anonymous 4 KB pages read more slowly through the
TLB; otherwise an anonymous buffer of the same size, in 4 KB pages.
A decode step reads its weights in pieces, one matrix product after the other (a layer's
q/k/v, output, gate/up and down matrices, then the head: 121 for SmolLM2), its threads
waiting for each other at the end of each: ``measure_pieces`` reads the mapped weights so
(read_limit.c's ``rkllmd_read_pieces_seconds``, one parallel region, a barrier after each
piece) and whole, alternating: what splitting the stream alone costs.
Run alone: python bench/read_limit.py [--megabytes 538] [--march haswell] [--rounds 5]
           python bench/read_limit.py --pieces   (the bundled model's weights, whole and in a step's pieces)
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
    threads: int  # of the best reading: every core's, or one (see measure)
    best_gbps: float  # the best round of the best thread and stream count
    best_streams: int
    gbps_by_streams: dict[int, float]  # the best round of each stream count, with the best thread count
    rounds_gbps: list[float]  # every round at the best stream count (for min/median/max)
    memory: str = "anonymous 4 KB pages"  # what was read

    def tokens_per_s(self) -> float:
        """The decode rate that reading ``n_bytes`` a token at the best bandwidth allows."""
        return self.best_gbps * 1e9 / self.n_bytes

    def describe(self) -> str:
        r = self.rounds_gbps
        return (f"{self.n_bytes / 1e6:.1f} MB ({self.memory}) read by {self.threads} threads: best {self.best_gbps:.2f} GB/s "
                f"({self.best_streams} streams per thread; that count's rounds min/median/max "
                f"{min(r):.2f}/{statistics.median(r):.2f}/{max(r):.2f} GB/s) = at most {self.tokens_per_s():.1f} tokens/s")


def streamed_bytes(weights) -> int:
    """Bytes of weights a decode step reads, as the C forward pass stores them (panels, padding included)."""
    return sum(a.nbytes for name, a in weights.arrays().items() if name not in NOT_STREAMED)


def weights_region(weights) -> np.ndarray | None:
    """The streamed weights' memory as one float32 array (with the few KB of norms between
    them), when all of ``weights``' arrays are views of one mapping (a weights file); else None."""
    arrays = [a for name, a in weights.arrays().items() if name not in NOT_STREAMED]

    def root(array):
        while isinstance(array, np.ndarray) and array.base is not None:
            array = array.base
        return array

    owner = root(arrays[0])
    if not isinstance(owner, mmap.mmap) or any(root(a) is not owner for a in weights.arrays().values()):
        return None
    start = min(a.ctypes.data for a in arrays)
    end = max(a.ctypes.data + a.nbytes for a in arrays)
    return np.frombuffer((ctypes.c_float * ((end - start) // 4)).from_address(start), np.float32)


def _build(march: str, folder: Path) -> ctypes.CDLL:
    cc = kernels.compiler()
    if cc is None:
        raise SystemExit("no C compiler (set CC, or install gcc)")
    library = folder / "read_limit.so"
    subprocess.run([cc, *kernels.compile_flags(march), "-shared", "-fPIC", "-o", str(library), str(SOURCE)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.rkllmd_read_seconds.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.rkllmd_read_seconds.restype = ctypes.c_double
    lib.rkllmd_read_threads.restype = ctypes.c_int
    lib.rkllmd_read_pieces_seconds.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_void_p]
    lib.rkllmd_read_pieces_seconds.restype = ctypes.c_double
    return lib


def _anonymous(n_bytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A buffer of 1.0s in anonymous 4 KB pages, every page mapped."""
    region = mmap.mmap(-1, n_bytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    buffer = np.frombuffer(region, np.float32, count=n_bytes // 4)
    buffer[:] = 1.0
    return region, buffer


def _check(lib: ctypes.CDLL, threads: int) -> None:
    """Every stream count reads every float once, whole and in pieces: on 1.0s, the sums count them."""
    region, buffer = _anonymous(4 << 20)
    sink = np.zeros(threads, np.float64)
    cuts = [0, 123_457, 1_000_003, buffer.size]  # uneven pieces, not whole lines
    addresses = np.array([buffer[a:].ctypes.data for a in cuts[:-1]], np.uintp)
    sizes = np.diff(cuts).astype(np.int64)
    for team in sorted({1, threads}):
        for streams in range(1, MAX_STREAMS + 1):
            lib.rkllmd_read_seconds(buffer.ctypes.data, buffer.size, streams, team, sink.ctypes.data)
            whole = float(sink.sum())
            lib.rkllmd_read_pieces_seconds(addresses.ctypes.data, sizes.ctypes.data, len(sizes), streams, team,
                                           sink.ctypes.data)
            if whole != buffer.size or float(sink.sum()) != buffer.size:
                raise RuntimeError(f"the probe read {whole} (whole) and {sink.sum()} (in pieces) floats' worth, not "
                                   f"{buffer.size}, with {streams} streams on {team} threads")
    del buffer
    region.close()


def measure(n_bytes: int, march: str = kernels.NATIVE, rounds: int = 5, weights=None) -> ReadLimit:
    """The best read bandwidth over 1..16 streams per thread, each stream count ``rounds`` times,
    interleaved, reading ``weights``' own memory when they are mapped from a file (``weights_region``),
    else ``n_bytes`` of anonymous memory."""
    with tempfile.TemporaryDirectory(prefix="rkllmd-read-limit-") as folder:
        lib = _build(march, Path(folder))
        threads = lib.rkllmd_read_threads()
        _check(lib, threads)
        region, memory = None, "the weights' own mapping"
        buffer = weights_region(weights) if weights is not None else None
        if buffer is None:
            region, buffer = _anonymous(n_bytes)
            memory = ReadLimit.memory
        sink = np.zeros(threads, np.float64)
        # (threads, streams per thread): every thread, as a decode step on a quiet machine, and one,
        # as forward.c's decode on a busy one (whichever reads faster now is the limit).
        ways = [(team, streams) for team in sorted({threads, 1}, reverse=True) for streams in range(1, MAX_STREAMS + 1)]
        rounds_by_way: dict[tuple[int, int], list[float]] = {way: [] for way in ways}
        lib.rkllmd_read_seconds(buffer.ctypes.data, buffer.size, 4, threads, sink.ctypes.data)  # warm-up
        for _ in range(rounds):
            for team, streams in ways:
                seconds = lib.rkllmd_read_seconds(buffer.ctypes.data, buffer.size, streams, team, sink.ctypes.data)
                rounds_by_way[team, streams].append(buffer.nbytes / seconds / 1e9)
        del buffer
        if region is not None:
            region.close()
    best_way = max(rounds_by_way, key=lambda way: max(rounds_by_way[way]))
    best = {s: max(r) for (team, s), r in rounds_by_way.items() if team == best_way[0]}
    return ReadLimit(n_bytes - n_bytes % 4, best_way[0], max(rounds_by_way[best_way]), best_way[1], best,
                     rounds_by_way[best_way], memory)


def step_pieces(weights) -> list[np.ndarray]:
    """The streamed weights in the order and pieces a decode step's products read them."""
    layers = [matrix[layer] for layer in range(len(weights.wqkv)) for matrix in (weights.wqkv, weights.wo, weights.wgu, weights.wd)]
    return [*layers, weights.head]


@dataclass
class PiecesLimit:
    n_pieces: int
    whole_gbps: float  # the best of reading the weights' region at once
    pieces_gbps: float  # the best of reading them in the step's pieces
    memory: str


def measure_pieces(weights, march: str = kernels.NATIVE, rounds: int = 3) -> PiecesLimit:
    """The best bandwidth over 1..16 streams per thread (every thread) reading ``weights``
    whole and in a decode step's pieces (``step_pieces``), alternating, ``rounds`` times each."""
    pieces = step_pieces(weights)
    addresses = np.array([piece.ctypes.data for piece in pieces], np.uintp)
    sizes = np.array([piece.size for piece in pieces], np.int64)
    n_bytes = int(sizes.sum()) * 4
    with tempfile.TemporaryDirectory(prefix="rkllmd-read-limit-") as folder:
        lib = _build(march, Path(folder))
        threads = lib.rkllmd_read_threads()
        _check(lib, threads)
        region, memory = None, "the weights' own mapping"
        whole = weights_region(weights)
        if whole is None:  # not one mapping: read the pieces' bytes as one anonymous buffer
            region, whole = _anonymous(n_bytes)
            memory = ReadLimit.memory
        sink = np.zeros(threads, np.float64)
        best_whole = best_pieces = 0.0
        for _ in range(rounds):
            for streams in range(1, MAX_STREAMS + 1):
                seconds = lib.rkllmd_read_seconds(whole.ctypes.data, whole.size, streams, threads, sink.ctypes.data)
                best_whole = max(best_whole, whole.nbytes / seconds / 1e9)
                seconds = lib.rkllmd_read_pieces_seconds(addresses.ctypes.data, sizes.ctypes.data, len(pieces), streams,
                                                         threads, sink.ctypes.data)
                best_pieces = max(best_pieces, n_bytes / seconds / 1e9)
        del whole
        if region is not None:
            region.close()
    return PiecesLimit(len(pieces), best_whole, best_pieces, memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=538.0)
    parser.add_argument("--march", default=kernels.NATIVE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pieces", action="store_true", help="the bundled model's weights, whole and in a decode step's pieces")
    args = parser.parse_args()
    if args.pieces:
        from daemon import KERNELS_DIR, WEIGHTS_DIR  # the benchmarks' kept weights, mapped

        from rkllmd.backends.cpu.backend import CpuBackend

        backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
        backend.load()
        limit = measure_pieces(backend.model.w, args.march, args.rounds)
        print(f"{streamed_bytes(backend.model.w) / 1e6:.1f} MB ({limit.memory}), best of 1-16 streams per thread and "
              f"{args.rounds} rounds: whole {limit.whole_gbps:.2f} GB/s; in a step's {limit.n_pieces} pieces "
              f"{limit.pieces_gbps:.2f} GB/s ({limit.pieces_gbps / limit.whole_gbps:.3f} of whole)")
        return
    limit = measure(int(args.megabytes * 1e6), args.march, args.rounds)
    print(limit.describe())
    print("| streams per thread | best GB/s |\n|---:|---:|")
    for streams, gbps in limit.gbps_by_streams.items():
        print(f"| {streams} | {gbps:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
