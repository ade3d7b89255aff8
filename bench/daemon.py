"""Start a real rkllmd for a benchmark and time how long it takes to answer."""

from __future__ import annotations

import contextlib
import statistics
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import rkllmd  # noqa: F401  (before numpy: sets OpenBLAS's thread timeout as in the daemon)
from rkllmctl import Client, DaemonUnreachable

ROOT = Path(__file__).resolve().parent.parent


#: Dequantized weights and the compiled decode kernel, shared by the benchmarks' daemons and
#: in-process backends (each maps or loads them, as a daemon does after its first start),
#: unless a benchmark points RKLLMD_MODEL_WEIGHTS_DIR elsewhere (to time a first start, say).
WEIGHTS_DIR = Path.home() / ".cache" / "rkllmd-bench" / "weights"
KERNELS_DIR = Path.home() / ".cache" / "rkllmd-bench" / "kernels"


@dataclass
class Running:
    socket: Path
    ready_s: float  # from spawn to the first answered ping
    text_dir: Path
    pid: int


@contextlib.contextmanager
def running_daemon(*args: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """A real rkllmd on a private socket and folders, stopped (SIGTERM) on exit."""
    env = {"RKLLMD_MODEL_WEIGHTS_DIR": str(WEIGHTS_DIR), "RKLLMD_MODEL_KERNELS_DIR": str(KERNELS_DIR), **(env or {})}
    folder = Path(tempfile.mkdtemp(prefix="rkb", dir="/tmp"))
    sock, text_dir = folder / "run" / "rkllmd.sock", folder / "text"
    text_dir.mkdir()
    command = [sys.executable, "-m", "rkllmd", "--backend", "cpu", "--socket", str(sock),
               "--cache-dir", str(text_dir), "--binary-cache-dir", str(folder / "bin"), "--log-level", "warning", *args]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rkllmd exited with {proc.returncode}")
            if sock.exists():
                try:
                    with Client(sock, timeout=1) as client:
                        client.ping()
                    break
                except DaemonUnreachable:
                    pass
            time.sleep(0.005)
        yield Running(sock, time.perf_counter() - started, text_dir, proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def words(n_tokens: int) -> str:
    """Plain text of roughly ``n_tokens`` tokens (SmolLM2 spends about 1.3 tokens a word here)."""
    base = ("The daemon owns the model and serves every local application over one socket, "
            "so a slow prefill is paid once and then restored from its cache. ").split()
    n_words = int(n_tokens / 1.3)
    return " ".join(base[i % len(base)] for i in range(n_words))


def print_overhead(base: str, other: str, added_by: str, base_runs: list, other_runs: list, prompt_tokens: int) -> None:
    """The side-by-side table of what the ``other`` path adds to ``base``: runs are
    (TTFT ms, decode tokens/s, tokens generated), medians compared."""
    assert {r[2] for r in base_runs} == {r[2] for r in other_runs}, "both sides must generate the same tokens"
    ttft_b, ttft_o = statistics.median(r[0] for r in base_runs), statistics.median(r[0] for r in other_runs)
    tps_b, tps_o = statistics.median(r[1] for r in base_runs), statistics.median(r[1] for r in other_runs)
    print(f"{len(base_runs)} runs each, interleaved; {prompt_tokens}-token prompt, {base_runs[0][2]} tokens generated\n")
    print(f"| | {base} | {other} | {added_by} adds |")
    print("|---|---:|---:|---:|")
    print(f"| time to first token | {ttft_b:.1f} ms | {ttft_o:.1f} ms | {ttft_o - ttft_b:+.1f} ms |")
    print(f"| decode rate | {tps_b:.2f} tokens/s | {tps_o:.2f} tokens/s | {(tps_b / tps_o - 1) * 100:+.2f} % time |")
