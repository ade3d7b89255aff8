"""Two versions of the C forward pass (forward.c) decoding on the real SmolLM2 weights, side
by side: this tree's and another git revision's, each against the read probe of the same
moment.

forward_versions.py times versions on a random model in the driver's own memory; this one
loads both builds into one process over the weights' own mapping (the pages a daemon's
decode reads), and in each round runs the read probe (read_limit.c, one round of 1-16
streams), then --steps decode steps of each version after a --prompt-tokens prompt:
each version's median step as tokens/s and as a ratio to that round's limit. Rounds
alternate so that this VM's drifting bandwidth hits both versions alike.
Run: python bench/decode_versions.py [--against main] [--rounds 8] [--march native]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import KERNELS_DIR, ROOT, WEIGHTS_DIR, words  # noqa: E402
import read_limit  # noqa: E402  (after daemon, which imports rkllmd first)

import numpy as np  # noqa: E402

from rkllmd.backends.cpu import kernels  # noqa: E402
from rkllmd.backends.cpu.backend import CpuBackend  # noqa: E402
from rkllmd.backends.cpu.model import Model  # noqa: E402


def kernel_of(source: Path, march: str, folder: Path) -> kernels.Kernel:
    """forward.c at ``source`` built for ``march`` into ``folder``, loaded."""
    this_tree, kernels.SOURCE = kernels.SOURCE, source
    try:
        return kernels.c_kernel(folder, march)
    finally:
        kernels.SOURCE = this_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="main", help="git revision of the other version (default: main)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="decode steps per version and round (median kept)")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--march", default=kernels.NATIVE)
    args = parser.parse_args()
    backend = CpuBackend(weights_dir=WEIGHTS_DIR, kernels_dir=KERNELS_DIR)
    backend.load()
    base = backend.model
    relative = kernels.SOURCE.relative_to(ROOT)
    with tempfile.TemporaryDirectory(prefix="rkllmd-decode-versions-") as scratch:
        other = Path(scratch) / "forward.c"
        other.write_bytes(subprocess.run(["git", "show", f"{args.against}:{relative}"], cwd=ROOT, capture_output=True,
                                         check=True).stdout)
        models = {}
        for label, source in ((args.against, other), ("this tree", kernels.SOURCE)):
            folder = Path(scratch) / str(len(models))
            folder.mkdir()
            models[label] = Model(base.config, base.w, base.context_length, base.prefill_chunk,
                                  kernel_of(source, args.march, folder))
        messages = [{"role": "user", "content": "Continue this text forever: " + words(args.prompt_tokens)}]
        ids = backend.tokenizer.encode(backend.render(messages))[: args.prompt_tokens]
        slots = {label: model.new_slot() for label, model in models.items()}
        first = {label: int(np.argmax(model.prefill(slots[label], ids, 0))) for label, model in models.items()}
        n_bytes = read_limit.streamed_bytes(base.w)
        ratios: dict[str, list[float]] = {label: [] for label in models}
        print(f"{args.rounds} rounds: the probe, then {args.steps} decode steps after {len(ids)} prompt tokens of each "
              f"version (-march={args.march})\n")
        print("| round | probe GB/s | " + " | ".join(f"{label}: tokens/s, / limit" for label in models) + " |")
        print("|---:|---:|" + "---:|" * len(models))
        for r in range(args.rounds):
            probe = read_limit.measure(n_bytes, args.march, rounds=1, weights=base.w)
            limit = probe.tokens_per_s()
            cells = []
            for label, model in models.items():
                times = []
                for i in range(args.steps):
                    started = time.perf_counter()
                    model.decode(slots[label], first[label], len(ids) + i)
                    times.append(time.perf_counter() - started)
                tps = 1 / statistics.median(times)
                ratios[label].append(tps / limit)
                cells.append(f"{tps:.1f}, {tps / limit:.3f}")
            print(f"| {r + 1} | {probe.best_gbps:.1f} | " + " | ".join(cells) + " |", flush=True)
    print("\nstep / limit, min/median/max over the rounds: " + "; ".join(
        f"{label} {min(v):.3f}/{statistics.median(v):.3f}/{max(v):.3f}" for label, v in ratios.items()))


if __name__ == "__main__":
    main()
