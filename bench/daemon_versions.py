"""Two versions of the whole daemon decoding, side by side: this tree's and another git
revision's, each a real rkllmd (its runner, socket loop and client included) on the same
kept weights, against the read probe of the same moment.

decode_versions.py compares forward.c alone, in process; this one also times what runs
between two decode steps (the runner's Python: sampling, the token's text, its frame to
the daemon). Both daemons run at once, idle but for the answer being timed; each round
runs the read probe (read_limit.c, one round of 1-16 streams) before and after each
version's greedy answer of --tokens after a --prompt-tokens prompt, and the versions
alternate which goes first, so that this VM's drifting bandwidth hits both alike. Prints
each answer's decode_tps and its ratio to the probe just before it (with the probe after,
where the memory changed mode meanwhile), then the ratios over all answers and over the
answers whose memory kept its mode.
Run: python bench/daemon_versions.py [--against main] [--rounds 12]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, ROOT, WEIGHTS_DIR, words  # noqa: E402
from decode_profile import MODE_CHANGE  # noqa: E402
import read_limit  # noqa: E402  (after daemon, which imports rkllmd first)

from rkllmctl import Client, DaemonUnreachable  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402


@contextlib.contextmanager
def daemon_of(tree: Path, folder: Path) -> Iterator[Client]:
    """A real rkllmd run from the sources in ``tree`` (its own kernels folder), and a client."""
    sock = folder / "run" / "rkllmd.sock"
    (folder / "text").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "RKLLMD_MODEL_WEIGHTS_DIR": str(WEIGHTS_DIR),
           "RKLLMD_MODEL_KERNELS_DIR": str(folder / "kernels")}
    proc = subprocess.Popen([sys.executable, "-m", "rkllmd", "--backend", "cpu", "--socket", str(sock),
                             "--cache-dir", str(folder / "text"), "--binary-cache-dir", str(folder / "bin"),
                             "--log-level", "warning"], env=env, cwd=tree)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rkllmd from {tree} exited with {proc.returncode}")
            with contextlib.suppress(DaemonUnreachable, OSError):
                client = Client(sock, timeout=600)
                client.ping()
                break
            time.sleep(0.05)
        with client:
            yield client
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="main", help="git revision of the other version (default: main)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64, help="tokens each answer decodes")
    parser.add_argument("--prompt-tokens", type=int, default=478)
    args = parser.parse_args()
    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    n_bytes = read_limit.streamed_bytes(backend.model.w)
    messages = [{"role": "user", "content": words(args.prompt_tokens)}]
    scratch = Path(tempfile.mkdtemp(prefix="rkllmd-daemon-versions-"))
    try:
        other = scratch / "tree"
        other.mkdir()
        archive = subprocess.run(["git", "archive", "--format=tar", args.against], cwd=ROOT, capture_output=True, check=True)
        (scratch / "tree.tar").write_bytes(archive.stdout)
        with tarfile.open(scratch / "tree.tar") as tar:
            tar.extractall(other, filter="data")
        with daemon_of(other, scratch / "a") as theirs, daemon_of(ROOT, scratch / "b") as ours:
            clients = {args.against: theirs, "this tree": ours}
            for client in clients.values():  # each daemon's first answer builds or loads its kernel
                client.generate(messages=messages, max_tokens=8, temperature=0, no_cache=True).wait()
            ratios: dict[str, list[float]] = {label: [] for label in clients}
            steady: dict[str, list[float]] = {label: [] for label in clients}  # the memory kept its mode
            print(f"{args.rounds} rounds: per version, the probe, then a greedy answer of {args.tokens} tokens after "
                  f"{args.prompt_tokens} prompt tokens; versions alternate which goes first\n")
            print("| round | " + " | ".join(f"{label}: probe GB/s, tokens/s, / limit" for label in clients) + " |")
            print("|---:|" + "---:|" * len(clients))
            for r in range(args.rounds):
                order = list(clients) if r % 2 == 0 else list(reversed(clients))
                cells = {}
                for label in order:
                    probe = read_limit.measure(n_bytes, "native", rounds=1, weights=backend.model.w)
                    result = clients[label].generate(messages=messages, max_tokens=args.tokens, temperature=0,
                                                     no_cache=True).wait()
                    after = read_limit.measure(n_bytes, "native", rounds=1, weights=backend.model.w)
                    tps = result.stats["decode_tps"]
                    ratios[label].append(tps / probe.tokens_per_s())
                    changed = abs(after.best_gbps / probe.best_gbps - 1) > MODE_CHANGE
                    if not changed:
                        steady[label].append(ratios[label][-1])
                    cells[label] = f"{probe.best_gbps:.1f}, {tps:.1f}, {ratios[label][-1]:.3f}" + (
                        f" (after: {after.best_gbps:.1f})" if changed else "")
                print(f"| {r + 1} | " + " | ".join(cells[label] for label in clients) + " |", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    def spread(values: list[float]) -> str:
        return f"{min(values):.3f}/{statistics.median(values):.3f}/{max(values):.3f}" if values else "none"

    print("\ndaemon decode / limit, min/median/max over the rounds: " + "; ".join(
        f"{label} {spread(v)}" for label, v in ratios.items()))
    print(f"over the answers whose probe after was within {MODE_CHANGE:.0%} of the one before: " + "; ".join(
        f"{label} {spread(v)} ({len(v)} of {len(ratios[label])})" for label, v in steady.items()))


if __name__ == "__main__":
    main()
