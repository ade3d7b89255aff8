"""The promise behind every prompt cache: restoring a prefix state and prefilling the rest,
or prefilling a prefix and decoding token by token, gives bit for bit what prefilling
everything gives, on every CPU. Checked on SmolLM2 under several OpenBLAS kernel sets,
and on the C forward pass itself built for baseline x86-64, AVX2, AVX-512 (when this CPU
has it) and aarch64 (cross-compiled, run under qemu-user), across thread counts."""

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

from conftest import ROOT

DRIVER = Path(__file__).with_name("forward_driver.c")
AARCH64_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
IN_CI = os.environ.get("CI") == "true"

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
    text = " ".join(["The river starts in the mountains, where snow melts each spring and feeds small streams;",
                     "it turns a mill, passes under three stone bridges and carries barges to the sea."] * 8)
    ids = backend.tokenizer.encode(get_template("smollm2-instruct").render([{"role": "user", "content": text}]))
    assert 256 < len(ids) < 400, len(ids)
    full = model.prefill(ids, 0).copy()
    n = len(ids)
    cache = model.save_state(n)
    for split in (1, 7, 129, 257, n - 1):  # odd ones, across tiles, chunks, attention chunks
        model.prefill(ids[:split], 0)
        state = model.save_state(split)
        model.keys[..., split:] = 7.0  # stale positions past the prefix must not matter
        model.values[:, :, split:] = -7.0
        model.restore_state(state, split)
        assert np.array_equal(model.prefill(ids[split:], split), full), f"restored {split}, then the rest"
    model.prefill(ids[: n - 12], 0)
    for pos in range(n - 12, n):
        logits = model.decode(ids[pos], pos)
    assert np.array_equal(logits, full), "prefix, then decode steps"
    after = model.save_state(n)
    assert np.array_equal(after.keys, cache.keys) and np.array_equal(after.values, cache.values)
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


# -- the C forward pass on every target ------------------------------------------------

#: (layers, dim, heads, kv_heads, ffn, vocab, tokens): awkward widths (not multiples of
#: the 16 lanes), head groups of 1 and of all heads, more tokens than an attention chunk
#: (made 16 positions for the driver) and than a tile.
SHAPES = [(2, 40, 4, 2, 72, 67, 40), (1, 36, 6, 6, 100, 33, 21), (1, 128, 2, 1, 200, 50, 35)]


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
        message = f"{AARCH64_CC} and {QEMU} are needed (apt-get install gcc-aarch64-linux-gnu qemu-user)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return cc, qemu


def test_aarch64_build_under_qemu_matches_the_x86_builds(tmp_path, x86_outputs):
    cc, qemu = aarch64_tools()
    driver = build_driver(cc, None, tmp_path)
    command = [qemu, "-L", "/usr/aarch64-linux-gnu", str(driver)]
    for shape in SHAPES:
        one, two = (run_driver(command, shape, threads) for threads in (1, 2))
        assert one == two, shape
        assert one == x86_outputs["haswell"][shape], shape
