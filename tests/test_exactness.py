"""The promise behind every prompt cache and every batch: restoring a prefix state and
prefilling the rest, prefilling a prefix and decoding token by token, or decoding beside
other streams gives bit for bit what prefilling everything alone gives, on every CPU.
Checked on SmolLM2 under several OpenBLAS kernel sets and thread counts, and on the C
forward pass itself built for baseline x86-64, AVX2, AVX-512 (when this CPU has it) and
aarch64 (cross-compiled, run under qemu-user), across thread counts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rkllmd.backends.cpu import kernels

from conftest import ROOT, skip_without

DRIVER = Path(__file__).with_name("forward_driver.c")
AARCH64_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"

SPLITS_PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from rkllmd.backends.cpu.backend import CpuBackend
    from rkllmd.templates import get_template
    backend = CpuBackend(context_length=512, prefill_chunk=int(sys.argv[1]))
    backend.load()
    assert backend.describe()["decode"].startswith("C, "), backend.describe()["decode"]
    model = backend.model
    slot = model.new_slot()
    text = " ".join(["The river starts in the mountains, where snow melts each spring and feeds small streams;",
                     "it turns a mill, passes under three stone bridges and carries barges to the sea."] * 8)
    ids = backend.tokenizer.encode(get_template("smollm2-instruct").render([{"role": "user", "content": text}]))
    assert 256 < len(ids) < 400, len(ids)
    full = model.prefill(slot, ids, 0)
    n = len(ids)
    cache = model.save_state(slot, n)
    for split in (1, 7, 129, 257, n - 1):  # odd ones, across tiles, chunks, attention chunks
        model.prefill(slot, ids[:split], 0)
        state = model.save_state(slot, split)
        stale = model.context_length - split  # positions past the prefix must not matter
        slot.write(split, np.full((*slot.keys.shape[1:-1], stale), 7.0, np.float32),
                   np.full((*slot.values.shape[1:-2], stale, slot.values.shape[-1]), -7.0, np.float32))
        model.restore_state(slot, state, split)
        assert np.array_equal(model.prefill(slot, ids[split:], split), full), f"restored {split}, then the rest"
    model.prefill(slot, ids[: n - 12], 0)
    for pos in range(n - 12, n):
        logits = model.decode(slot, ids[pos], pos)
    assert np.array_equal(logits, full), "prefix, then decode steps"
    after = model.save_state(slot, n)
    assert np.array_equal(after.keys, cache.keys) and np.array_equal(after.values, cache.values)
    print("exact")
    """
)

BATCH_PROBE = textwrap.dedent(
    """
    import numpy as np
    from rkllmd.backends.cpu.backend import CpuBackend
    from rkllmd.backends.cpu.model import Rows
    backend = CpuBackend(context_length=600, prefill_chunk=64)
    backend.load()
    assert backend.describe()["decode"].startswith("C, "), backend.describe()["decode"]
    model, rng = backend.model, np.random.default_rng(5)
    # Four streams, each alone: its logits after each token from its own first decoded
    # position on. They decode at different positions, the two long ones across the end of
    # the first attention chunk (256 positions).
    streams = [[int(t) for t in rng.integers(0, model.config.vocab_size, n)] for n in (70, 290, 51, 275)]
    firsts = [40, 240, 27, 230]
    alone = []
    for ids, first in zip(streams, firsts):
        slot = model.new_slot()
        model.prefill(slot, ids[:first], 0)
        alone.append([model.decode(slot, ids[pos], pos) for pos in range(first, len(ids))])
    # Batched: every stream from its first decoded position, one decode row each a step,
    # beside a newcomer's prompt chunks (whose own last logits must be its alone ones too),
    # in slots filled with garbage.
    slots = [model.new_slot() for _ in streams]
    for slot, ids, first in zip(slots, streams, firsts):
        slot.keys[...], slot.values[...] = 7.0, -7.0
        model.prefill(slot, ids[:first], 0)
    newcomer, newcomer_slot = streams[1], model.new_slot()
    newcomer_alone = model.prefill(model.new_slot(), newcomer, 0)
    batched = [[] for _ in streams]
    for step in range(max(len(ids) - first for ids, first in zip(streams, firsts))):
        owners = [i for i, (ids, first) in enumerate(zip(streams, firsts)) if first + step < len(ids)]
        parts = [Rows(slots[i], [streams[i][firsts[i] + step]], firsts[i] + step) for i in owners]
        chunk = newcomer[step * 37 : step * 37 + 37]
        if chunk:
            parts.insert(1, Rows(newcomer_slot, chunk, step * 37, logits=step * 37 + 37 >= len(newcomer)))
        logits = model.step(parts)
        if chunk and parts[1].logits:
            assert np.array_equal(logits[1], newcomer_alone), "a prompt's chunks beside decode rows"
            logits = np.delete(logits, 1, axis=0)
        for owner, row in zip(owners, logits):
            batched[owner].append(row)
    for i, (ours, reference) in enumerate(zip(batched, alone)):
        assert len(ours) == len(reference) and all(np.array_equal(a, b) for a, b in zip(ours, reference)), f"stream {i}"
    print("exact")
    """
)


@pytest.mark.parametrize("coretype", ["Haswell", "Prescott"])
def test_restored_prefixes_and_decode_steps_are_bitwise_identical_to_prefilling(coretype):
    """On SmolLM2 (through the C forward pass, in prefill chunks of 50), under OpenBLAS
    kernel sets that compute a row differently depending on the rows around it. Many more
    splits and chunk sizes: the driver tests below."""
    done = subprocess.run(
        [sys.executable, "-c", SPLITS_PROBE, "50"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OPENBLAS_CORETYPE": coretype},
    )
    assert done.returncode == 0 and done.stdout.strip() == "exact", done.stderr[-2000:]


@pytest.mark.parametrize("threads", ["1", "3"])
def test_batched_streams_get_the_logits_each_gets_alone(threads):
    """On SmolLM2: four streams at different positions (across attention chunks) decoded
    together, beside another's prompt chunks, each in its own slot, get bit for bit the
    logits each gets decoding alone; with one thread and with more threads than cores."""
    done = subprocess.run(
        [sys.executable, "-c", BATCH_PROBE], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "passive"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "exact", done.stderr[-2000:]


# -- the C forward pass on every target ------------------------------------------------

#: (layers, dim, heads, kv_heads, ffn, vocab, tokens): awkward widths (not multiples of
#: the 16 lanes), head groups of 1 and of all heads, more tokens than an attention chunk
#: (made 16 positions for the driver) and than a tile; and SmolLM2's groups of three heads
#: of 64 dimensions (whose weighted values AVX-512 sums together: forward.c's ``combine_sets``).
SHAPES = [(2, 40, 4, 2, 72, 67, 40), (1, 36, 6, 6, 100, 33, 21), (1, 128, 2, 1, 200, 50, 35), (1, 192, 3, 1, 128, 50, 40)]


def driver_flags(march: str | None) -> list[str]:
    flags = kernels.compile_flags(march) if march else [f for f in kernels.compile_flags() if not f.startswith("-march")]
    return [*flags, "-DATTENTION_CHUNK=16"]


def build_driver(cc: str, march: str | None, folder: Path) -> Path:
    out = folder / f"driver-{march or 'aarch64'}"
    subprocess.run([cc, *driver_flags(march), "-o", str(out), str(DRIVER), "-lm"], check=True, capture_output=True)
    return out


def run_driver(command: list[str], shape: tuple[int, ...], threads: int) -> bytes:
    """The driver's output; it fails by itself when any split, chunking or decode path
    differs from prefilling everything at once."""
    done = subprocess.run(
        [*command, *map(str, shape), "7"], capture_output=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive"},  # 3 threads on 2 cores: no spinning
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def x86_targets() -> list[str]:
    if os.uname().machine != "x86_64":
        pytest.skip("the x86 builds need an x86-64 machine")
    flags = Path("/proc/cpuinfo").read_text()
    return ["x86-64", "haswell"] + (["native"] if " avx512f" in flags else [])


@pytest.fixture(scope="module")
def x86_outputs(tmp_path_factory) -> dict[str, dict[tuple, bytes]]:
    """Every x86 build's outputs per shape, the same at 1, 2 and 3 threads."""
    folder = tmp_path_factory.mktemp("drivers")
    outputs: dict[str, dict[tuple, bytes]] = {}
    for march in x86_targets():
        driver = build_driver(kernels.compiler() or "cc", march, folder)
        outputs[march] = {}
        for shape in SHAPES:
            by_threads = {threads: run_driver([str(driver)], shape, threads) for threads in (1, 2, 3)}
            assert by_threads[1] == by_threads[2] == by_threads[3], (march, shape)
            outputs[march][shape] = by_threads[1]
    return outputs


def test_every_x86_build_is_exact_and_thread_count_independent(x86_outputs):
    """Builds with fused multiply-add (AVX2, AVX-512) give the same bits; baseline x86-64,
    without it, rounds every product twice: the same to float32 rounding."""
    assert set(x86_outputs) >= {"x86-64", "haswell"}
    for shape in SHAPES:
        if "native" in x86_outputs:
            assert x86_outputs["native"][shape] == x86_outputs["haswell"][shape], shape
        baseline, fused = (np.frombuffer(x86_outputs[m][shape], np.float32) for m in ("x86-64", "haswell"))
        np.testing.assert_allclose(baseline, fused, rtol=1e-4, atol=1e-5 * float(np.abs(fused).max()))


def aarch64_tools() -> tuple[str, str]:
    """The cross compiler and qemu-user: .ci/setup installs them; only a machine where
    they cannot be had skips (never CI)."""
    cc, qemu = shutil.which(AARCH64_CC), shutil.which(QEMU)
    if not (cc and qemu):
        skip_without(f"{AARCH64_CC} and {QEMU} (.ci/setup installs them: apt-get install gcc-aarch64-linux-gnu qemu-user)")
    return cc, qemu


def test_aarch64_build_under_qemu_matches_the_x86_builds(tmp_path, x86_outputs):
    cc, qemu = aarch64_tools()
    driver = build_driver(cc, None, tmp_path)
    command = [qemu, "-L", "/usr/aarch64-linux-gnu", str(driver)]
    for shape in SHAPES:
        one, two = (run_driver(command, shape, threads) for threads in (1, 2))
        assert one == two, shape
        assert one == x86_outputs["haswell"][shape], shape
