"""Which instruction set each side of a comparison runs, so that a benchmark compares like
with like and says so.

This machine has AVX-512; users have AVX2 boxes. Our C forward pass can be built for
another target (``--march haswell``: AVX2 without AVX-512), and OpenBLAS, numpy's BLAS,
picks its kernels at start from the CPU unless ``OPENBLAS_CORETYPE`` names a set. A
side-by-side run of our AVX2 build against numpy must give numpy the AVX2 kernels too:
``match_blas`` re-executes the benchmark with the matching ``OPENBLAS_CORETYPE`` before
OpenBLAS has run a single product.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: OpenBLAS's kernel set for a gcc ``-march`` target (those a benchmark is likely to ask for).
CORETYPES = {
    "haswell": "Haswell", "x86-64-v3": "Haswell", "skylake": "Haswell",
    "x86-64": "Prescott", "x86-64-v2": "Nehalem",
    "skylake-avx512": "SkylakeX", "x86-64-v4": "SkylakeX",
}


def cpu_features() -> str:
    """The CPU's model and the vector extensions the kernels can use."""
    info = Path("/proc/cpuinfo").read_text(errors="replace")
    name = re.search(r"model name\s*:\s*(.*)", info)
    found = re.search(r"(?:flags|Features)\s*:\s*(.*)", info)
    flags = set(found.group(1).split()) if found else set()
    wanted = ("avx2", "fma", "avx512f", "avx512vbmi", "asimd", "sve")
    return f"{name.group(1) if name else os.uname().machine}; {', '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def match_blas(march: str) -> None:
    """Re-execute this benchmark with OPENBLAS_CORETYPE set to ``march``'s kernel set,
    unless it is set already (by the user, or by the re-execution) or ``march`` is native
    (OpenBLAS then picks this CPU's best, as gcc does)."""
    coretype = CORETYPES.get(march)
    if coretype and "OPENBLAS_CORETYPE" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OPENBLAS_CORETYPE": coretype})


def numpy_blas() -> str:
    """numpy's BLAS and the kernel set it runs in this process (OpenBLAS's core name)."""
    import numpy as np

    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    described = f"numpy {np.__version__}, {blas.get('name', 'BLAS')} {blas.get('version', '')}".rstrip()
    with contextlib.suppress(OSError):
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
        for path in sorted(p for p in paths if re.search(r"openblas[^/]*\.so", p, re.IGNORECASE)):
            library = ctypes.CDLL(path)
            for symbol in ("openblas_get_corename", "scipy_openblas_get_corename64_", "scipy_openblas_get_corename"):
                if hasattr(library, symbol):
                    getattr(library, symbol).restype = ctypes.c_char_p
                    core = getattr(library, symbol)().decode()
                    how = f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}" if "OPENBLAS_CORETYPE" in os.environ else "picked for this CPU"
                    return f"{described}, {core} kernels ({how})"
    return described


def c_model(backend, march: str):
    """A second model on ``backend``'s loaded weights, run by forward.c built for ``march``
    (the backend itself builds for this CPU only), and a few words on that build."""
    from daemon import KERNELS_DIR

    from rkllmd.backends.cpu import kernels
    from rkllmd.backends.cpu.model import Model

    base, kernel = backend.model, kernels.c_kernel(KERNELS_DIR, march)
    model = Model(base.config, base.w, base.context_length, base.prefill_chunk, kernel)
    return model, f"forward.c built with -march={march} ({kernel.detail})"


def daemon_env(march: str) -> dict[str, str]:
    """Environment for a benchmark's daemon whose forward.c is built for ``march``: the
    daemon always builds ``-march=native``, so for another target it gets a compiler
    (``$CC``, which kernels.py honours) that appends ``-march=march`` (gcc takes the last),
    and a kernels folder of its own. Native: nothing changes."""
    if march == "native":
        return {}
    from rkllmd.backends.cpu import kernels

    folder = Path(tempfile.mkdtemp(prefix=f"rkllmd-{march}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    wrapper = folder / f"cc-{march}"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(kernels.compiler() or "cc")} "$@" -march={shlex.quote(march)}\n')
    wrapper.chmod(0o755)
    (folder / "kernels").mkdir()
    return {"CC": str(wrapper), "RKLLMD_MODEL_KERNELS_DIR": str(folder / "kernels")}


def builds_avx512(march: str) -> bool:
    """Whether the C compiler targets AVX-512 for ``-march=march`` (on this CPU, for native)."""
    from rkllmd.backends.cpu import kernels

    defined = subprocess.run([kernels.compiler() or "cc", f"-march={march}", "-dM", "-E", "-"], input="",
                             capture_output=True, text=True, check=True).stdout
    return "__AVX512F__" in defined
