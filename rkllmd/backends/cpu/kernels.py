"""The decode step in C (``decode.c``), compiled here on first use; numpy's otherwise.

Decode streams all the weights once per token, so its speed is the memory bandwidth the
matrix-vector products reach, plus the work between them. ``Model._decode_numpy`` is the
reference: readable, and about 1.5x slower, as numpy's products (OpenBLAS sgemv) reach
about 60 % of this machine's bandwidth on the model's shapes and ~30 small numpy calls per
layer cost as much again as their arithmetic. ``decode.c`` computes the same step (same
arrays, same order of operations per element, float32 throughout) in one OpenMP parallel
region per token (bench/decode_profile.py, bench/llama_cpp_compare.py).

The C file is compiled by the machine's compiler (``$CC``, else cc, gcc or clang) for
this very CPU (``-march=native``) the first time, into a folder kept between starts,
under a name hashing its source, the compiler, the flags and the CPU; later starts load
it in milliseconds. Builds are written beside and renamed into place under the folder's
lock, and a library is loaded only if it is a regular file of ours that no one else can
write. Without a compiler, or when the build fails, decode runs in numpy
(``model.kernels = "auto"``); "c" makes that a load error instead, "numpy" never
compiles anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...caches.atomic import commit, locked_folder, remove_leftovers, temporary_beside

if TYPE_CHECKING:
    from .model import Model, ModelConfig

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
#: Must match RKLLMD_KERNEL_ABI in decode.c.
KERNEL_ABI = 3
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
MODES = ("auto", "c", "numpy")

_DIMS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "capacity")
_WEIGHTS = ("head", "output_norm", "attn_norm", "ffn_norm", "wqkv", "wo", "wgu", "wd", "rope_cos", "rope_sin")
_BUFFERS = ("keys", "values", "x", "h", "qkv", "queries", "scores", "attended", "proj", "gate_up", "act", "logits")


class ModelStruct(ctypes.Structure):
    """decode.c's ``struct rkllmd_model``, field for field."""

    _fields_ = (
        [(name, ctypes.c_int64) for name in _DIMS]
        + [("norm_eps", ctypes.c_double)]
        + [(name, ctypes.POINTER(ctypes.c_float)) for name in _WEIGHTS + _BUFFERS]
    )


class KernelError(Exception):
    """The C decode step cannot be built or loaded (the message says why)."""


@dataclass(frozen=True)
class Kernel:
    """A loaded ``decode.c`` library; ``bind`` ties its step to one model's arrays."""

    library: ctypes.CDLL
    detail: str  # a few words for status: where it came from, its threads

    def bind(self, model: Model, arrays: dict[str, np.ndarray]) -> BoundStep:
        return BoundStep(self.library.rkllmd_decode, model, arrays)


def _sizes(cfg: ModelConfig, capacity: int) -> dict[str, int]:
    """The fewest elements decode.c reads or writes in each array."""
    L, D, F, V, hd = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return {
        "head": V * D, "output_norm": D, "attn_norm": L * D, "ffn_norm": L * D,
        "wqkv": L * (q + 2 * kv) * D, "wo": L * D * q, "wgu": L * 2 * F * D, "wd": L * D * F,
        "rope_cos": capacity * (hd // 2), "rope_sin": capacity * (hd // 2),
        "keys": L * kv * capacity, "values": L * kv * capacity,
        "x": D, "h": D, "qkv": q + 2 * kv, "queries": q, "scores": cfg.n_heads * capacity, "attended": q,
        "proj": D, "gate_up": 2 * F, "act": F, "logits": V,
    }


class BoundStep:
    """``step(token, pos)``: the C decode step on one model's arrays, which it keeps alive
    (the struct holds only their addresses)."""

    def __init__(self, function: ctypes._CFuncPtr, model: Model, arrays: dict[str, np.ndarray]):
        cfg, capacity = model.config, model.keys.shape[-1]
        # The C code indexes by the dimensions alone: an array too small would be read past its end.
        needed = _sizes(cfg, capacity)
        if set(arrays) != set(needed):
            raise KernelError(f"the decode step needs exactly {sorted(needed)}")
        for name, array in arrays.items():
            if array.dtype != np.float32 or not array.flags.c_contiguous or array.size < needed[name]:
                raise KernelError(f"{name} is not a C-contiguous float32 array of {needed[name]} elements")
        self._arrays = arrays
        self._struct = ModelStruct(
            **{name: getattr(cfg, name) for name in _DIMS if name != "capacity"},
            capacity=capacity,
            norm_eps=cfg.norm_eps,
            **{name: array.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for name, array in arrays.items()},
        )
        self._function = function
        self._pointer = ctypes.byref(self._struct)

    def __call__(self, token: int, pos: int) -> None:
        if self._function(self._pointer, token, pos) != 0:
            raise MemoryError("the decode step could not allocate its attention scratch memory")


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU's feature flags."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if re.match(r"(flags|Features)\s*:", line):
                flags = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}/{flags}"


def library_key(cc: str) -> str:
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"cannot run the C compiler {cc}: {exc}") from None
    source = SOURCE.read_bytes()
    identity = "\0".join([str(KERNEL_ABI), cc, version, " ".join(FLAGS), _cpu_identity()])
    return hashlib.sha256(source + b"\0" + identity.encode()).hexdigest()[:16]


def _compile(cc: str, dest: Path) -> None:
    """Compile ``decode.c`` into ``dest`` (overwritten)."""
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", str(dest), str(SOURCE)],
            capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"cannot run the C compiler {cc}: {exc}") from None
    if done.returncode != 0:
        last_lines = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise KernelError(f"{cc} failed (exit {done.returncode}): {last_lines}")


def _load_library(path: Path) -> ctypes.CDLL:
    """Load a built kernel, refusing one another user could have written."""
    info = os.stat(path, follow_symlinks=False)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise KernelError(f"{path} is not a regular file of ours that only we can write; not loading it")
    try:
        library = ctypes.CDLL(str(path))
        abi = library.rkllmd_kernel_abi()
    except (OSError, AttributeError) as exc:
        raise KernelError(f"cannot load {path}: {exc}") from None
    if abi != KERNEL_ABI:
        raise KernelError(f"{path} has kernel ABI {abi}, not {KERNEL_ABI}")
    library.rkllmd_model_struct_size.restype = ctypes.c_int64
    if library.rkllmd_model_struct_size() != ctypes.sizeof(ModelStruct):
        raise KernelError(f"{path}'s model struct is not ModelStruct: the two have drifted apart")
    return library


def _build_into(folder: Path) -> tuple[ctypes.CDLL, Path]:
    """The kernel library in ``folder`` for this source, compiler and CPU, built if missing
    or unusable (another's, corrupt)."""
    cc = compiler()
    if cc is None:
        raise KernelError("no C compiler found (set CC, or install gcc)")
    key = library_key(cc)
    path = folder / f"decode.{key}.so"
    with locked_folder(folder):
        if path.exists():
            try:
                return _load_library(path), path
            except KernelError as exc:
                log.warning("rebuilding the decode kernel: %s", exc)
                path.unlink()
        remove_leftovers(folder)
        with temporary_beside(path) as tmp:
            _compile(cc, tmp)
            commit(tmp, path)
        log.info("compiled the decode kernel into %s", path)
        for other in folder.glob("decode.*.so"):
            if other != path:
                with contextlib.suppress(FileNotFoundError):
                    other.unlink()
        return _load_library(path), path


def c_kernel(folder: Path | None) -> Kernel:
    """The C decode step, built in ``folder`` (None: once per process, in a temporary
    folder removed once loaded); ``KernelError`` when it cannot be had."""
    return _process_kernel() if folder is None else _kernel_in(folder)


@functools.cache
def _process_kernel() -> Kernel:
    return _kernel_in(None)


def _kernel_in(folder: Path | None) -> Kernel:
    try:
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="rkllmd-kernel-") as scratch:
                library, _ = _build_into(Path(scratch))
                where = "built for this process"
        else:
            library, path = _build_into(folder)
            where = str(path)
    except OSError as exc:
        if folder is not None:  # unusable (read-only, full, not a folder): build it for this process
            log.warning("cannot keep the decode kernel in %s: %s", folder, exc)
            return _process_kernel()
        raise KernelError(f"cannot build the decode kernel in a temporary folder: {exc}") from None
    library.rkllmd_decode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    library.rkllmd_decode.restype = ctypes.c_int
    threads = library.rkllmd_kernel_threads()
    return Kernel(library, f"C, {threads} thread{'s' * (threads != 1)} ({where})")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise KernelError(f"model.kernels must be one of {', '.join(MODES)}, not {mode!r}")


def load_kernel(mode: str, folder: Path | None) -> tuple[Kernel | None, str]:
    """The decode step ``model.kernels`` asks for (None: numpy's; see the module docstring),
    and a few words on it for status."""
    check_mode(mode)
    if mode == "numpy":
        return None, "numpy (model.kernels = numpy)"
    try:
        kernel = c_kernel(folder)
    except KernelError as exc:
        if mode == "c":
            raise
        log.warning("decode runs in numpy, slower: %s", exc)
        return None, f"numpy (no C kernel: {exc})"
    return kernel, kernel.detail
