"""A direct reader for GGUF v2/v3 model files.

Parses the metadata and tensor table with ``struct`` and maps the tensor data with
``numpy.memmap``, so opening a 100 MB model costs tens of milliseconds (the ``gguf``
package's reader spends seconds building objects for the vocabulary arrays).
Quantized tensors are dequantized to float32 with vectorised numpy.

Layout (all little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64
metadata count, the metadata key/value pairs, the tensor infos (name, u32 n_dims,
u64 dims innermost first, u32 ggml type, u64 offset into the data section), padding
to ``general.alignment`` (default 32), then the tensor data.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR_FORMATS = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_SCALAR_DTYPES = {
    _UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
    _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8",
}

# ggml tensor types this reader can dequantize: type id -> (name, block size, bytes per block).
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 0, 1, 2, 3, 8
GGML_TYPES = {
    GGML_F32: ("F32", 1, 4),
    GGML_F16: ("F16", 1, 2),
    GGML_Q4_0: ("Q4_0", 32, 18),
    GGML_Q4_1: ("Q4_1", 32, 20),
    GGML_Q8_0: ("Q8_0", 32, 34),
}


class GGUFError(ValueError):
    """The file is not a GGUF model this reader can use (bad magic, truncated, ...)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (GGUF lists dims innermost first)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


_LENGTH = struct.Struct("<Q")


class _Cursor:
    """Sequential little-endian reads over the header bytes, with truncation checks."""

    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFError("file is truncated inside the GGUF header")
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("<Q")
        try:
            return str(self.take(length), "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"GGUF string is not UTF-8: {exc}") from None

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row: a vocabulary's 50,000 entries, so without per-string calls."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        unpack_length = _LENGTH.unpack_from
        out = []
        try:
            for _ in range(count):
                (length,) = unpack_length(buf, pos)
                pos += 8
                if pos + length > size:
                    raise GGUFError("file is truncated inside the GGUF header")
                out.append(str(buf[pos : pos + length], "utf-8"))
                pos += length
        except struct.error:
            raise GGUFError("file is truncated inside the GGUF header") from None
        except UnicodeDecodeError as exc:
            raise GGUFError(f"GGUF string is not UTF-8: {exc}") from None
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type == _STRING:
                return self.strings(count)
            if item_type in _SCALAR_DTYPES:
                dtype = np.dtype(_SCALAR_DTYPES[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise GGUFError(f"unknown GGUF array item type {item_type}")
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        raise GGUFError(f"unknown GGUF metadata value type {vtype}")


class GGUFFile:
    """An opened GGUF file: ``metadata``, ``tensors`` (by name) and their data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file_size = self.path.stat().st_size
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if self.file_size else np.zeros(0, np.uint8)
        except OSError as exc:
            raise GGUFError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.data_offset = self._parse(memoryview(self._data))

    def _parse(self, buf: memoryview) -> int:
        cur = _Cursor(buf)
        if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (bad magic)")
        cur.take(4)
        version = cur.scalar("<I")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
            infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0:
            raise GGUFError(f"invalid general.alignment {alignment}")
        data_offset = -(-cur.pos // alignment) * alignment
        for name, shape, ggml_type, rel_offset in infos:
            if ggml_type not in GGML_TYPES:
                raise GGUFError(f"tensor {name} has ggml type {ggml_type}, which this reader does not support")
            _, block, block_bytes = GGML_TYPES[ggml_type]
            n_elements = int(np.prod(shape, dtype=np.int64))
            if shape and shape[-1] % block:
                raise GGUFError(f"tensor {name} rows of {shape[-1]} are not whole {block}-element blocks")
            info = TensorInfo(name, shape, ggml_type, data_offset + rel_offset, n_elements // block * block_bytes)
            if info.offset + info.nbytes > self.file_size:
                raise GGUFError(f"{self.path} is truncated: tensor {name} ends past the end of the file")
            self.tensors[name] = info
        return data_offset

    def fingerprint(self) -> str:
        """sha256 of everything before the tensor data, plus the file size.

        Covers the metadata and the tensor table (names, shapes, types, offsets) without
        reading the hundred megabytes of weights, so it is cheap to compute at load.
        """
        digest = hashlib.sha256(memoryview(self._data)[: self.data_offset])
        digest.update(str(self.file_size).encode())
        return digest.hexdigest()

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a read-only view into the mapped file)."""
        info = self.tensors[name]
        return self._data[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new float32 array of its numpy shape."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def close(self) -> None:
        self._data = np.zeros(0, np.uint8)


def _f16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """Column of float16 scales at byte ``start`` of each block, widened to float32."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2").astype(np.float32)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of ``raw`` bytes of ``ggml_type``, reshaped to ``shape``.

    Matches ggml's reference dequantizers: Q4_0 ``(q - 8) * d``, Q4_1 ``q * d + m``,
    Q8_0 ``q * d``; in 4-bit blocks byte j holds element j (low nibble) and j + 16
    (high nibble).
    """
    if ggml_type not in GGML_TYPES:
        raise GGUFError(f"ggml type {ggml_type} is not supported")
    _, block, block_bytes = GGML_TYPES[ggml_type]
    if ggml_type == GGML_F32:
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    if ggml_type == GGML_F16:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, block_bytes)
    d = _f16_column(blocks, 0)
    if ggml_type == GGML_Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(shape)
    nibbles_at = 2 if ggml_type == GGML_Q4_0 else 4
    packed = blocks[:, nibbles_at:]
    q = np.empty((len(blocks), block), dtype=np.float32)
    np.bitwise_and(packed, 0x0F, out=q[:, :16], casting="unsafe")
    np.right_shift(packed, 4, out=q[:, 16:], casting="unsafe")
    if ggml_type == GGML_Q4_0:
        q -= 8.0
        q *= d
    else:
        q *= d
        q += _f16_column(blocks, 2)
    return q.reshape(shape)
