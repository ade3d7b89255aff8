"""Dequantized weights kept in a file and memory-mapped, for a start in milliseconds.

Dequantizing a GGUF's tensors into the forward pass's float32 layout costs seconds of
CPU at every start (SmolLM2-135M: 1-3 s on two cores). Mapping the finished arrays
from a file costs milliseconds, and the pages belong to the page cache: shared, read on
first use (the kernel is asked to read ahead at once), dropped under memory pressure
and read again rather than swapped.

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


def load(folder: Path, gguf: GGUFFile, cfg: ModelConfig, key: str) -> Weights | None:
    """The weights mapped from ``folder`` for ``key`` (``weights_key``), or None when no valid file is there."""
    path = path_for(folder, gguf, key)
    expected, total = _header(key, cfg, gguf.path)
    try:
        with open(path, "rb") as f:
            found = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            if found != expected or size != total:
                log.warning("ignoring %s: it was not written for this model and layout, or is truncated", path)
                return None
            mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot map %s: %s", path, exc)
        return None
    with contextlib.suppress(AttributeError, OSError):  # madvise is Linux-only
        mapped.madvise(mmap.MADV_WILLNEED)
    arrays, _ = _layout(cfg)
    return Weights(**{
        name: np.ndarray(tuple(spec["shape"]), dtype="<f4", buffer=mapped, offset=spec["offset"])
        for name, spec in arrays.items()
    })


def load_or_build(
    folder: Path, gguf: GGUFFile, cfg: ModelConfig, build: Callable[[], Weights]
) -> tuple[Weights, str, Hold | None]:
    """Mapped weights from ``folder``, else ``build()``'s, saved there for the next start;
    a few words on which (shown by status); and the hold that keeps the artifact store's
    collectors from removing the file while it is used (release it when done).

    A folder that cannot be created, locked or written costs the next start time, nothing else.
    """
    try:
        with locked_folder(folder):
            key = weights_key(gguf)
            weights = load(folder, gguf, cfg, key)
            path = path_for(folder, gguf, key)
            if weights is not None:
                log.info("weights mapped from %s", path)
                return weights, f"mapped from {path}", Hold(folder, key)
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
