"""The daemon's memory and idle cost: resident memory with the default model, CPU and
wake-ups while idle, and how memory grows with context length and cached prefixes.

One daemon (default model and context), measured from /proc:
- idle: RSS split into anonymous and file-backed (the mapped weights), CPU time and
  thread wake-ups (context switches) over --idle-seconds, per thread;
- context: RSS and peak RSS after generations with prompts of growing length;
- prefixes: RSS after each of several cached prefixes is used (each stays in the LRU);
- context length: daemons configured for different context lengths, idle and after a prompt.
Run: python bench/memory.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import running_daemon, words  # noqa: E402

from rkllmctl import Client  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0])
    return fields


def memory(pid: int) -> str:
    s = status_kb(pid)
    return f"{s['VmRSS'] / 1024:.0f} MB (anonymous {s['RssAnon'] / 1024:.0f}, file {s['RssFile'] / 1024:.0f}; peak {s['VmHWM'] / 1024:.0f})"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wakeups(pid: int) -> Counter:
    """Context switches so far, by thread name."""
    counts: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            text = (task / "status").read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                counts[f"{name} ({task.name})"] += int(line.split()[1])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--contexts", type=int, nargs="+", default=[500, 1000, 2000, 3500])
    parser.add_argument("--prefixes", type=int, default=4, help="cached prefixes of ~500 tokens each")
    parser.add_argument("--context-lengths", type=int, nargs="+", default=[1024, 4096, 8192],
                        help="model.context_length of the daemons compared in the last table")
    args = parser.parse_args()

    with running_daemon() as daemon, Client(daemon.socket, timeout=600) as client:
        pid, text_dir = daemon.pid, daemon.text_dir
        time.sleep(1)  # let start-up work (the first scan, the observers) settle
        print(f"ready {daemon.ready_s:.2f} s after spawn; idle RSS {memory(pid)}\n")

        before_cpu, before = cpu_seconds(pid), wakeups(pid)
        time.sleep(args.idle_seconds)
        cpu, after = cpu_seconds(pid) - before_cpu, wakeups(pid)
        print(f"idle for {args.idle_seconds:.0f} s: CPU {cpu * 1000:.0f} ms ({cpu / args.idle_seconds * 100:.3f} %), "
              f"wake-ups {sum((after - before).values())}")
        for thread, n in sorted((after - before).items()):
            print(f"- {thread}{' (main: the socket loop)' if thread.endswith(f'({pid})') else ''}: {n}")

        print("\n| prompt tokens | daemon RSS after the generation |")
        print("|---:|---|")
        for n in args.contexts:
            result = client.generate("Summarise: " + words(n), max_tokens=8, no_cache=True).wait()
            print(f"| {result.stats['prompt_tokens']} | {memory(pid)} |")

        print("\n| cached prefixes used | tokens each | daemon RSS |")
        print("|---:|---:|---|")
        for i in range(args.prefixes):
            system = f"Prefix number {i}. " + words(500)
            (text_dir / f"p{i}.txt").write_text(system)
            info = client.cache_wait(f"p{i}", timeout=600)
            result = client.generate("Hello", system=system, max_tokens=1).wait()
            assert result.stats["cached_tokens"] > 0
            print(f"| {i + 1} | {info['tokens']} | {memory(pid)} |")
        held = client.status()["caches"]["memory"]
        print(f"\nprefix states held in memory (status): {held['states']}, {held['used_bytes'] / 2**20:.0f} MB "
              f"of a {held['budget_bytes'] / 2**20:.0f} MB budget")

    # The KV cache is allocated for the configured context: compare daemons that differ only there.
    print("\n| model.context_length | RSS idle | RSS after a 477-token prompt |")
    print("|---:|---|---|")
    for length in args.context_lengths:
        with running_daemon(env={"RKLLMD_MODEL_CONTEXT_LENGTH": str(length)}) as daemon, Client(daemon.socket, timeout=600) as client:
            idle = memory(daemon.pid)
            client.generate("Summarise: " + words(500), max_tokens=8, no_cache=True).wait()
            print(f"| {length} | {idle} | {memory(daemon.pid)} |")


if __name__ == "__main__":
    main()
