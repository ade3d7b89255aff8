"""The forward pass in C (``forward.c``: prefill chunks and decode steps), compiled here
on first use; numpy's otherwise.

``forward.c`` computes every token row with a fixed order of operations whatever the
number of rows, so a restored prefix plus the rest, or a prefix plus decode steps, gives
bit for bit what prefilling everything gives, on any CPU (its comment says how). Decode
streams all the weights once per token, so its speed is the memory bandwidth its
matrix-vector products reach; prefill is bound by arithmetic, which its tiles of
tokens x panels of outputs keep in registers (bench/decode_profile.py, bench/llama_cpp_compare.py).
``Model``'s numpy passes are the reference it is tested against.

The C file is compiled by the machine's compiler (``$CC``, else cc, gcc or clang) for
this very CPU (``-march=native``; benchmarks may ask for another target, such as
``haswell`` for AVX2) the first time, into a folder kept between starts, under a name
hashing its source, the compiler, the flags and the CPU; later starts load it in
milliseconds. Builds are written beside and renamed into place under the folder's lock,
and a library is loaded only if it is a regular file of ours that no one else can write.
Without a compiler, or when the build fails, the forward pass runs in numpy
(``model.kernels = "auto"``), slower and on a second, unpacked copy of the weights (see
``model.DenseWeights``), and a restored prefix is then exact only as far as
BLAS computes a row alike whatever the rows around it; "c" makes that a load error
instead, "numpy" never compiles anything.
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

import numpy as np

from ...store import KEY_RE, Hold, Kind, commit, locked_folder, remove_leftovers, remove_superseded, temporary_beside
from .architecture import ModelConfig

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("forward.c")
#: Must match RKLLMD_KERNEL_ABI in forward.c.
KERNEL_ABI = 7
#: Outputs per panel of a weight matrix: forward.c's LANES (see ``model.to_panels``).
PANEL = 16
NATIVE = "native"
COMPILE_TIMEOUT_S = 120
#: The artifact store's units of this kind (decode.*: the libraries before the forward pass).
PATTERN = f"(?:forward|decode)\\.(?P<key>{KEY_RE})\\.so"
#: A library loaded stays mapped for the life of the process (ctypes cannot unload it):
#: so does its hold, which keeps collectors from removing it.
_HOLDS: dict[Path, Hold] = {}

_DIMS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "capacity")
_WEIGHTS = ("head", "output_norm", "attn_norm", "ffn_norm", "wqkv", "wo", "wgu", "wd", "rope_cos", "rope_sin")


class ModelStruct(ctypes.Structure):
    """forward.c's ``struct rkllmd_model``, field for field."""

    _fields_ = (
        [(name, ctypes.c_int64) for name in _DIMS]
        + [("norm_eps", ctypes.c_double)]
        + [(name, ctypes.POINTER(ctypes.c_float)) for name in _WEIGHTS]
    )


class KernelError(Exception):
    """The C forward pass cannot be built or loaded (the message says why)."""


@dataclass(frozen=True)
class Kernel:
    """A loaded ``forward.c`` library; ``bind`` ties its forward pass to one model's weights."""

    library: ctypes.CDLL
    detail: str  # a few words for status: where it came from, its threads

    def bind(self, config: ModelConfig, capacity: int, arrays: dict[str, np.ndarray]) -> BoundForward:
        """The forward pass on the weights ``arrays`` of a model of ``config``'s dimensions whose
        KV caches hold ``capacity`` positions."""
        return BoundForward(self.library, config, capacity, arrays)


def _padded(n_out: int) -> int:
    """Outputs of a matrix in panels: n_out rounded up to whole panels."""
    return -(-n_out // PANEL) * PANEL


def _sizes(cfg: ModelConfig, capacity: int) -> dict[str, int]:
    """The fewest elements forward.c reads or writes in each array."""
    L, D, F, V, hd = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return {
        "head": _padded(V) * D, "output_norm": D, "attn_norm": L * D, "ffn_norm": L * D,
        "wqkv": L * _padded(q + 2 * kv) * D, "wo": L * _padded(D) * q, "wgu": L * 2 * _padded(F) * D,
        "wd": L * _padded(D) * F,
        "rope_cos": capacity * (hd // 2), "rope_sin": capacity * (hd // 2),
    }


def kv_cache_floats(cfg: ModelConfig, capacity: int, block: int) -> int:
    """The floats of one KV cache's keys (or values): ``capacity`` positions rounded up to
    whole blocks of ``block`` (forward.c's ``kv_block_offset``)."""
    return -(-capacity // block) * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * block


class BoundForward:
    """``forward(tokens, positions, caches, logit_rows, logits)``: the C forward pass on one
    model's weights, which it keeps alive (the struct holds only their addresses)."""

    def __init__(self, library: ctypes.CDLL, cfg: ModelConfig, capacity: int, arrays: dict[str, np.ndarray]):
        # The C code indexes by the dimensions alone: an array too small would be read past its end.
        needed = _sizes(cfg, capacity)
        if set(arrays) != set(needed):
            raise KernelError(f"the forward pass needs exactly {sorted(needed)}")
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
        self._function = library.rkllmd_forward
        self._hidden_function = library.rkllmd_forward_hidden
        self._pointer = ctypes.byref(self._struct)
        #: Positions per block of a KV cache (forward.c's ``kv_block_offset``; tests build smaller ones).
        self.kv_block = int(library.rkllmd_kv_block())
        self._cache_size = kv_cache_floats(cfg, capacity, self.kv_block)

    def cache_address(self, array: np.ndarray) -> int:
        """The address of one KV cache's keys or values, checked to be what the C code indexes."""
        if array.dtype != np.float32 or not array.flags.c_contiguous or array.size != self._cache_size:
            raise KernelError(f"a KV cache must be a C-contiguous float32 array of {self._cache_size} elements")
        return array.ctypes.data

    def __call__(self, rows: np.ndarray, logit_rows: np.ndarray, logits: np.ndarray) -> None:
        """Run token rows (``rows``: int64 [4, n], C-contiguous: tokens, positions, and each
        row's keys and values by ``cache_address``); the logits of rows ``logit_rows`` (int64)
        into ``logits`` (float32, [len(logit_rows), vocab]). The caller checks tokens, positions
        and that no two rows write one position of one cache: the C code trusts them."""
        n, address = rows.shape[1], self._rows_address(rows)
        if self._function(self._pointer, n, address, address + 8 * n, address + 16 * n, address + 24 * n,
                          len(logit_rows), logit_rows.ctypes.data, logits.ctypes.data) != 0:
            raise MemoryError("the forward pass could not allocate its scratch memory")

    def hidden(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Run token rows as ``__call__`` does; every row's final hidden state after the output
        norm into ``out`` (float32, [n, dim]): what embeddings pool."""
        n, address = rows.shape[1], self._rows_address(rows)
        if self._hidden_function(self._pointer, n, address, address + 8 * n, address + 16 * n, address + 24 * n,
                                 out.ctypes.data) != 0:
            raise MemoryError("the forward pass could not allocate its scratch memory")

    @staticmethod
    def _rows_address(rows: np.ndarray) -> int:
        if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[0] != 4 or not rows.flags.c_contiguous:
            raise KernelError("rows must be a C-contiguous int64 array of shape [4, n]")
        return rows.ctypes.data


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


def compile_flags(march: str = NATIVE) -> list[str]:
    """How forward.c is compiled for the CPU ``march`` names (before ``-shared``)."""
    return ["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off"]


def library_key(cc: str, march: str = NATIVE) -> str:
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"cannot run the C compiler {cc}: {exc}") from None
    source = SOURCE.read_bytes()
    identity = "\0".join([str(KERNEL_ABI), cc, version, " ".join(compile_flags(march)), _cpu_identity()])
    return hashlib.sha256(source + b"\0" + identity.encode()).hexdigest()[:16]


def _compile(cc: str, march: str, dest: Path) -> None:
    """Compile ``forward.c`` into ``dest`` (overwritten)."""
    try:
        done = subprocess.run(
            [cc, *compile_flags(march), "-shared", "-fPIC", "-o", str(dest), str(SOURCE), "-lm"],
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
    library.rkllmd_kv_block.restype = ctypes.c_int64
    if library.rkllmd_model_struct_size() != ctypes.sizeof(ModelStruct):
        raise KernelError(f"{path}'s model struct is not ModelStruct: the two have drifted apart")
    return library


def _build_into(folder: Path, march: str) -> tuple[ctypes.CDLL, Path]:
    """The kernel library in ``folder`` for this source, compiler and CPU, built if missing
    or unusable (another's, corrupt)."""
    cc = compiler()
    if cc is None:
        raise KernelError("no C compiler found (set CC, or install gcc)")
    key = library_key(cc, march)
    path = folder / f"forward.{key}.so"
    with locked_folder(folder):
        if path.exists():
            try:
                return _load_library(path), _held(folder, key, path)
            except KernelError as exc:  # replaced by the build's rename: a process that loaded it keeps its copy
                log.warning("rebuilding the forward kernel: %s", exc)
        remove_leftovers(folder)
        with temporary_beside(path) as tmp:
            _compile(cc, march, tmp)
            commit(tmp, path)
        log.info("compiled the forward kernel into %s", path)
        remove_superseded(Kind("kernels", folder, PATTERN), key)
        return _load_library(path), _held(folder, key, path)


def _held(folder: Path, key: str, path: Path) -> Path:
    """``path``, held from now on (called with the folder's lock held: no collector between)."""
    if path not in _HOLDS:
        _HOLDS[path] = Hold(folder, key)
    return path


def c_kernel(folder: Path | None, march: str = NATIVE) -> Kernel:
    """The C forward pass for the CPU ``march`` names (``-march``; the default is this
    one), built in ``folder`` (None: once per process, in a temporary folder removed once
    loaded); ``KernelError`` when it cannot be had."""
    return _process_kernel(march) if folder is None else _kernel_in(folder, march)


@functools.cache
def _process_kernel(march: str) -> Kernel:
    return _kernel_in(None, march)


def _kernel_in(folder: Path | None, march: str) -> Kernel:
    try:
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="rkllmd-kernel-") as scratch:
                library, _ = _build_into(Path(scratch), march)
                where = "built for this process"
        else:
            library, path = _build_into(folder, march)
            where = str(path)
    except OSError as exc:
        if folder is not None:  # unusable (read-only, full, not a folder): build it for this process
            log.warning("cannot keep the forward kernel in %s: %s", folder, exc)
            return _process_kernel(march)
        raise KernelError(f"cannot build the forward kernel in a temporary folder: {exc}") from None
    library.rkllmd_forward.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    library.rkllmd_forward.restype = ctypes.c_int
    library.rkllmd_forward_hidden.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 5]
    library.rkllmd_forward_hidden.restype = ctypes.c_int
    threads = library.rkllmd_kernel_threads()
    return Kernel(library, f"C, {threads} thread{'s' * (threads != 1)} ({where})")


#: What status says of the numpy forward pass (see the module docstring).
NUMPY_EXACTNESS = "; prefix reuse exact only where BLAS rows are"


def load_kernel(mode: str, folder: Path | None) -> tuple[Kernel | None, str]:
    """The forward pass ``model.kernels`` asks for (None: numpy's; see the module
    docstring), and a few words on it for status. ``mode`` is one the typed configuration
    allows (config.KERNEL_MODES)."""
    if mode == "numpy":
        return None, f"numpy (model.kernels = numpy){NUMPY_EXACTNESS}"
    try:
        kernel = c_kernel(folder)
    except KernelError as exc:
        if mode == "c":
            raise
        log.warning("the forward pass runs in numpy, slower, and restored prefixes are exact only as far as "
                    "BLAS computes rows alike: %s", exc)
        return None, f"numpy (no C kernel: {exc}){NUMPY_EXACTNESS}"
    return kernel, kernel.detail
