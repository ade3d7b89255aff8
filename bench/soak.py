"""Soak: many clients sending short generations (some with a prompt cache, some cancelled) for a long time.

    python bench/soak.py                      # 30 minutes against a private daemon it starts
    python bench/soak.py --minutes 5 --json soak.json
    python bench/soak.py --socket /run/rkllmd/rkllmd.sock --minutes 60   # against a running daemon

Prints a progress line every --every seconds and, at the end, the figures that
docs/reliability.md records: requests answered, lost and duplicated (the goal: 0),
errors, the worst queue wait against the average, the spread of the clients' mean
waits (fairness), and the daemon's memory and open files at the start and the end.
tests/test_load.py runs the same mix (class Mix) with a fixed number of requests.
Exit status 1 if anything was lost, duplicated or failed, or memory grew by more than
--rss-limit-mb between the first hundred requests and the end (beyond the growth of the
prefix states the daemon keeps, which its memory budget bounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from load_mix import Mix, summarize  # noqa: E402
from rkllmctl import Client, DaemonUnreachable  # noqa: E402

@contextlib.contextmanager
def private_daemon() -> Iterator[Path]:
    """A daemon of our own on a temporary socket (the CPU backend), stopped at the end."""
    folder = Path(tempfile.mkdtemp(prefix="rksoak", dir="/tmp"))
    sock = folder / "run" / "rkllmd.sock"
    (folder / "text").mkdir()
    log = open(folder / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "rkllmd", "--backend", "cpu", "--socket", str(sock), "--cache-dir", str(folder / "text"),
                             "--binary-cache-dir", str(folder / "bin"), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rkllmd exited with {proc.returncode}: {(folder / 'daemon.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("rkllmd did not answer within 300 s")
            if sock.exists():
                with contextlib.suppress(DaemonUnreachable):
                    with Client(sock, timeout=1) as client:
                        client.ping()
                    break
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--socket", type=Path, help="a running daemon (default: start a private one)")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--rss-limit-mb", type=float, default=8.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        sock = args.socket or stack.enter_context(private_daemon())
        mix = Mix(sock, clients=args.clients, duration_s=args.minutes * 60)
        print(f"soak: {args.clients} clients for {args.minutes:g} min against {sock}", flush=True)
        report = mix.run(progress_every=args.every)
    figures = summarize(report)
    for failure in report.failures:
        print(f"FAILURE {failure}")
    for key, value in figures.items():
        print(f"{key:>20}: {value}")
    if args.json:
        args.json.write_text(json.dumps({"minutes": args.minutes, **figures}, indent=1) + "\n")
    bad = figures["lost"] or figures["duplicated"] or figures["failures"] or figures["rss_growth_kb"] - figures["states_growth_kb"] > args.rss_limit_mb * 1024
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
