"""Dequantized weights kept in a file, for a start in a fraction of a second.

Dequantizing a GGUF's tensors into the forward pass's float32 layout costs seconds of
CPU at every start (SmolLM2-135M: 1-3 s on two cores); mapping the finished arrays from a
file costs milliseconds, and their pages are the page cache's: shared between processes,
dropped under memory pressure and read again rather than swapped.

A decode step streams every weight, and in 4 KB pages the hardware prefetchers stop at
every page and the TLB misses: SmolLM2's step took 11.95-12.11 ms on a mapping with 12 MB
of its 525 MB in 2 MB pages, against 11.03-11.65 in 2 MB pages (one process, alternating,
the read probe on each one's own memory at 52-54 GB/s for both). So where the kernel has
transparent huge pages (``model.weights_huge_pages``, on by default), the file is mapped
asking for them and faulted in at once (``_map_in_huge_pages``): a kernel whose page cache
holds the file in 2 MB folios maps it so (Linux 6.18 on ext4 mapped SmolLM2's whole, both
freshly written and read back after its cache was dropped; how the cache had come to hold
it in small folios the day of the 12 MB is not known). Where it does not (older kernels,
tmpfs without huge pages, files under 2 MB, a cache filled in small folios), the file is
read into the process's own memory asked for huge pages instead: not shared, swapped
rather than dropped. Without huge pages the file is mapped in the kernel's pages, read ahead at
once.

A file ``<dir>/<model file stem>.<key>.weights`` is a JSON header padded to
``HEADER_BYTES``, then the arrays of ``Weights`` in field order, each starting on a
``ALIGN``-byte boundary, float32 little-endian. The key hashes what the arrays depend
on: the model file's fingerprint (its header and size), its modification time, and
``LAYOUT_VERSION``. A file is used only when its header carries the expected key and
shapes and its size is exactly what the header promises; anything else is rebuilt.
Files are written beside and renamed into place, so a crash leaves no partial file,
and the other weights files of the same model file (older versions) are removed.
Daemons sharing the folder take turns through a lock file: the second to start waits
for the first to write the file, then maps it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...store import KEY_RE, Hold, Kind, commit, disk_full, locked_folder, remove_leftovers, remove_superseded, temporary_beside
from .gguf import GGUFFile
from .architecture import ModelConfig
from .model import Weights

log = logging.getLogger(__name__)

#: Bump whenever ``Weights``' layout (order, permutations, fusions) changes.
LAYOUT_VERSION = 3
MAGIC = "rkllmd-weights"
HEADER_BYTES = 4096
ALIGN = 64
SUFFIX = ".weights"
#: Which transparent huge pages the kernel gives: "[always] madvise never" and the like.
THP_MODES = Path("/sys/kernel/mm/transparent_hugepage/enabled")
#: Linux 5.14's madvise that faults a mapping's pages in at once (Python 3.12 names it).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
#: The share of a kept file mapped in 2 MB pages for the mapping to be kept rather than read.
MAPPED_HUGE_ENOUGH = 0.9
#: The artifact store's units of this kind.
PATTERN = f".+\\.(?P<key>{KEY_RE}){re.escape(SUFFIX)}"


def weights_key(gguf: GGUFFile) -> str:
    """What the dequantized arrays depend on, as a short hash."""
    stat = gguf.path.stat()
    source = f"{MAGIC}/{LAYOUT_VERSION}/{gguf.fingerprint()}/{stat.st_size}/{stat.st_mtime_ns}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _layout(cfg: ModelConfig) -> tuple[dict[str, dict], int]:
    """Each array's shape and offset in the file, and the file's total size."""
    arrays, offset = {}, HEADER_BYTES
    for name, shape in Weights.shapes(cfg).items():
        arrays[name] = {"shape": list(shape), "offset": offset}
        offset += -(-int(np.prod(shape)) * 4 // ALIGN) * ALIGN
    return arrays, offset


def _header(key: str, cfg: ModelConfig, model_path: Path) -> tuple[bytes, int]:
    arrays, total = _layout(cfg)
    header = {"magic": MAGIC, "layout": LAYOUT_VERSION, "key": key, "model": str(model_path),
              "dtype": "<f4", "arrays": arrays, "total_bytes": total}
    encoded = json.dumps(header, sort_keys=True).encode()
    if len(encoded) >= HEADER_BYTES:
        raise ValueError("weights header does not fit")
    return encoded.ljust(HEADER_BYTES, b" "), total


def path_for(folder: Path, gguf: GGUFFile, key: str) -> Path:
    return folder / f"{gguf.path.stem}.{key}{SUFFIX}"


def huge_pages_available() -> bool:
    """Whether this kernel gives anonymous memory transparent huge pages when asked (madvise)."""
    try:
        modes = THP_MODES.read_text()
    except OSError:
        return False
    return "[never]" not in modes and hasattr(mmap, "MADV_HUGEPAGE")


def _huge_share(memory: mmap.mmap) -> float:
    """The share of a file mapping's bytes mapped in 2 MB pages (/proc/self/smaps FilePmdMapped)."""
    view = np.frombuffer(memory, np.uint8)
    header = f"{view.ctypes.data:x}-"
    del view  # the mapping may be closed next
    with contextlib.suppress(OSError):
        with open("/proc/self/smaps") as smaps:
            fields: dict[str, int] = {}
            for line in smaps:
                if fields and re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                    break
                if line.startswith(header):
                    fields["Size"] = 0
                elif fields and (found := re.match(r"(\w+):\s+(\d+) kB", line)):
                    fields[found.group(1)] = int(found.group(2))
            if fields.get("Size"):
                return fields.get("FilePmdMapped", 0) / fields["Size"]
    return 0.0


def _map_in_huge_pages(f: BinaryIO, size: int) -> tuple[mmap.mmap, bool]:
    """The file ``f`` in 2 MB pages: mapped (shared, reclaimable) when the kernel maps it so,
    else read into private memory (see the module docstring); and whether it is mapped."""
    mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    with contextlib.suppress(OSError):  # refused: the share below says so
        mapped.madvise(mmap.MADV_HUGEPAGE)
    try:
        mapped.madvise(MADV_POPULATE_READ)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # the file shrank under us, no memory, ...: the caller rebuilds
            mapped.close()
            raise
        np.frombuffer(mapped, np.uint8)[::4096].max()  # before Linux 5.14: fault every page in by reading it
    if _huge_share(mapped) >= MAPPED_HUGE_ENOUGH:
        return mapped, True
    mapped.close()
    return _read_into_huge_pages(f, size), False


def _read_into_huge_pages(f: BinaryIO, size: int) -> mmap.mmap:
    """The whole file ``f`` in private anonymous memory asked to be in 2 MB pages."""
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # shared anonymous memory gets no huge pages
    with contextlib.suppress(OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    f.seek(0)
    view, done = memoryview(region), 0
    while done < size:
        read = f.readinto(view[done:])
        if not read:
            raise ValueError(f"the file ended after {done} of {size} bytes")
        done += read
    view.release()
    return region


def load(folder: Path, gguf: GGUFFile, cfg: ModelConfig, key: str, huge_pages: bool = False) -> tuple[Weights, str] | None:
    """The weights kept in ``folder`` for ``key`` (``weights_key``), in 2 MB pages if
    ``huge_pages`` (``_map_in_huge_pages``) else mapped, and a few words on which; None
    when no valid file is there."""
    path = path_for(folder, gguf, key)
    expected, total = _header(key, cfg, gguf.path)
    try:
        with open(path, "rb") as f:
            found = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            if found != expected or size != total:
                log.warning("ignoring %s: it was not written for this model and layout, or is truncated", path)
                return None
            if huge_pages:
                memory, mapped = _map_in_huge_pages(f, size)
            else:
                memory, mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ), True
                with contextlib.suppress(AttributeError, OSError):  # madvise is Linux-only
                    memory.madvise(mmap.MADV_WILLNEED)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    arrays, _ = _layout(cfg)
    weights = Weights(**{
        name: np.ndarray(tuple(spec["shape"]), dtype="<f4", buffer=memory, offset=spec["offset"])
        for name, spec in arrays.items()
    })
    for array in weights.arrays().values():
        array.flags.writeable = False  # the forward pass never writes to them
    if not huge_pages:
        return weights, f"mapped from {path}"
    return weights, f"mapped from {path} in 2 MB pages" if mapped else f"read from {path} into 2 MB pages"


def load_or_build(
    folder: Path, gguf: GGUFFile, cfg: ModelConfig, build: Callable[[], Weights], huge_pages: bool = True
) -> tuple[Weights, str, Hold | None]:
    """The weights kept in ``folder`` (read into 2 MB pages if ``huge_pages`` and the kernel
    has them, else mapped), else ``build()``'s, saved there for the next start; a few words
    on which (shown by status); and the hold that keeps the artifact store's collectors
    from removing the file while it is used (release it when done).

    A folder that cannot be created, locked or written costs the next start time, nothing else.
    """
    try:
        with locked_folder(folder):
            key = weights_key(gguf)
            loaded = load(folder, gguf, cfg, key, huge_pages and huge_pages_available())
            path = path_for(folder, gguf, key)
            if loaded is not None:
                weights, source = loaded
                log.info("weights %s", source)
                return weights, source, Hold(folder, key)
            weights = build()
            try:
                save(folder, gguf, cfg, weights, key)
            except OSError as exc:
                log.warning("cannot keep dequantized weights in %s: %s", folder, exc)
                return weights, "dequantized (not kept: cannot write)", None
            log.info("dequantized weights kept in %s for the next start", path)
            return weights, f"dequantized, kept in {path}", Hold(folder, key)
    except OSError as exc:  # the folder cannot be made or locked
        log.warning("cannot keep dequantized weights in %s: %s", folder, exc)
        return build(), "dequantized (not kept: folder unusable)", None


def save(folder: Path, gguf: GGUFFile, cfg: ModelConfig, weights: Weights, key: str) -> None:
    """Write ``weights`` for ``gguf`` under ``key`` atomically; remove older files of the same model file.

    Call with the folder's lock held (``load_or_build``): it also removes temporary files
    a killed writer left."""
    remove_leftovers(folder)
    path = path_for(folder, gguf, key)
    header, total = _header(key, cfg, gguf.path)
    layout, _ = _layout(cfg)
    with temporary_beside(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                for name, array in weights.arrays().items():
                    f.seek(layout[name]["offset"])
                    array.astype("<f4", copy=False).tofile(f)
                f.truncate(total)
        except OSError as exc:
            if disk_full(exc, folder):
                raise OSError(errno.ENOSPC, f"no space left on device for {total} bytes of weights ({exc})") from exc
            raise
        commit(tmp, path)
    # The older versions of the same model file (the same name): those no process holds.
    remove_superseded(Kind("weights", folder, re.escape(gguf.path.stem) + f"\\.(?P<key>{KEY_RE})" + re.escape(SUFFIX)), key)
