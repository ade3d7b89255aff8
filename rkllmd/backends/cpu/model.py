"""The llama transformer forward pass in float32 numpy: the reference for ``forward.c``.

Weights (``Weights``) are dequantized once, then kept memory-mapped between starts
(``weights_file``). Matrices are stored in the C forward pass's panels (``forward.c``,
loaded by ``kernels``): outputs in groups of ``PANEL``, each group's weights input by
input, so that one vector load gives ``PANEL`` outputs' weights for one input
(``to_panels``); q/k/v are fused into one matrix, and gate/up into one whose panels
alternate (gate, up, gate, ...), so that a thread computing a gate output also has its
up. The numpy passes work on an output-major copy (``DenseWeights``, made at load).
Query and key rows are reordered within each head from llama.cpp's adjacent-pair rotary
layout to "halves" (even components first, then odd): rotary embedding then works on two
contiguous halves, and attention scores are unchanged because queries and keys are
permuted alike.

The KV cache is preallocated for the whole context: keys as ``[layer, kv_head, dim,
position]`` (so query-key products read contiguous rows, several times faster than a
transposed view in decode) and values as ``[layer, kv_head, position, dim]``.

Prefill runs in chunks of ``prefill_chunk`` tokens (heartbeats and cancellation come
between them). With the C forward pass every position's result is bitwise independent
of how the prompt was split and of whether it was prefilled or decoded (see
``forward.c``). The numpy passes (``_prefill_numpy``, ``_decode_numpy``) compute the
same thing through BLAS, whose sums run in another order and whose result for a row may
depend on the rows around it: they agree with the C pass to float32 rounding, not bit
for bit (tests/test_decode_kernel.py compares them so; tests/test_exactness.py checks
the C pass's bits across splits, builds and thread counts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf import GGUFFile
from .kernels import PANEL, Kernel

log = logging.getLogger(__name__)

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    train_context_length: int

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> ModelConfig:
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"model architecture is {arch!r}; only 'llama' is supported")
        dim = int(metadata["llama.embedding_length"])
        n_heads = int(metadata["llama.attention.head_count"])
        n_kv_heads = int(metadata.get("llama.attention.head_count_kv", n_heads))
        # Both forward passes (and forward.c's indexing) rely on these.
        if not (0 < n_kv_heads <= n_heads and n_heads % n_kv_heads == 0 and dim % n_heads == 0
                and (dim // n_heads) % 2 == 0):
            raise ValueError(f"{n_heads} heads, {n_kv_heads} KV heads and embedding length {dim} do not divide evenly "
                             "into heads of an even dimension")
        head_dim = dim // n_heads
        rope_dims = int(metadata.get("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(f"rotary dimension {rope_dims} != head dimension {head_dim} is not supported")
        return cls(
            n_layers=int(metadata["llama.block_count"]),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=int(metadata["llama.feed_forward_length"]),
            vocab_size=len(metadata["tokenizer.ggml.tokens"]),
            rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(metadata["llama.attention.layer_norm_rms_epsilon"]),
            train_context_length=int(metadata.get("llama.context_length", 0)),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * 4


@dataclass
class KVState:
    """The KV cache of the first ``n_tokens`` positions (a prefix state).

    File layout, float32 little-endian, no header: all keys as
    ``[layer, kv_head, dim, position]``, then all values as ``[layer, kv_head, position,
    dim]``; keys' dims are in the halves rotary order (see the module docstring).
    """

    keys: np.ndarray
    values: np.ndarray

    @property
    def n_tokens(self) -> int:
        return self.values.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            self.keys.astype("<f4", copy=False).tofile(f)
            self.values.astype("<f4", copy=False).tofile(f)

    @classmethod
    def read(cls, path: Path, config: ModelConfig, n_tokens: int) -> KVState:
        """Read a state file; ``ValueError`` if its size is not that of ``n_tokens`` positions."""
        expected = n_tokens * config.kv_bytes_per_token
        flat = np.fromfile(path, dtype="<f4")
        if flat.nbytes != expected:
            raise ValueError(f"{path} holds {flat.nbytes} bytes; {n_tokens} positions take {expected}")
        half = flat.size // 2
        shape = (config.n_layers, config.n_kv_heads)
        keys = flat[:half].reshape(*shape, config.head_dim, n_tokens)
        values = flat[half:].reshape(*shape, n_tokens, config.head_dim)
        return cls(keys.astype(np.float32, copy=False), values.astype(np.float32, copy=False))


def _halves_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Row permutation taking each head's adjacent rotary pairs to (first half, second half)."""
    within = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(n_heads)[:, None] * head_dim + within).reshape(-1)


def to_panels(matrix: np.ndarray) -> np.ndarray:
    """(..., n_out, k) output-major -> (..., panels, k, PANEL): output o's weight for
    input k at [o // PANEL, k, o % PANEL]; the last panel zero-padded."""
    *lead, n_out, k = matrix.shape
    padded = np.zeros((*lead, -(-n_out // PANEL) * PANEL, k), np.float32)
    padded[..., :n_out, :] = matrix
    return np.ascontiguousarray(padded.reshape(*lead, -1, PANEL, k).swapaxes(-1, -2))


def from_panels(panels: np.ndarray, n_out: int) -> np.ndarray:
    """``to_panels``' inverse: the first ``n_out`` outputs, output-major."""
    *lead, n_panels, k, _ = panels.shape
    return np.ascontiguousarray(panels.swapaxes(-1, -2).reshape(*lead, n_panels * PANEL, k)[..., :n_out, :])


@dataclass
class Weights:
    """The float32 arrays the forward pass reads, in its layout (see the module docstring).

    Made by ``from_gguf`` (dequantizing) or mapped from a file by ``weights_file``; the
    forward pass never writes to them, so read-only memory maps serve as well as arrays.
    """

    head: np.ndarray  # panels of (vocab, dim): the tied embedding
    output_norm: np.ndarray  # (dim,)
    attn_norm: np.ndarray  # (layers, dim)
    ffn_norm: np.ndarray  # (layers, dim)
    wqkv: np.ndarray  # per layer panels of (q + 2 kv, dim): q and k rows in halves order
    wo: np.ndarray  # per layer panels of (dim, q)
    wgu: np.ndarray  # per layer panels of (ffn, dim), gate's and up's in turn
    wd: np.ndarray  # per layer panels of (dim, ffn)

    @staticmethod
    def shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every array's shape, in field order: what a weights file must hold."""
        L, q_dim, kv_dim = cfg.n_layers, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

        def panels(n_out: int, k: int) -> tuple[int, int, int]:
            return -(-n_out // PANEL), k, PANEL

        return {
            "head": panels(cfg.vocab_size, cfg.dim),
            "output_norm": (cfg.dim,),
            "attn_norm": (L, cfg.dim),
            "ffn_norm": (L, cfg.dim),
            "wqkv": (L, *panels(q_dim + 2 * kv_dim, cfg.dim)),
            "wo": (L, *panels(cfg.dim, q_dim)),
            "wgu": (L, 2 * -(-cfg.ffn_dim // PANEL), cfg.dim, PANEL),
            "wd": (L, *panels(cfg.dim, cfg.ffn_dim)),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, cfg: ModelConfig, progress: Callable[[str], None] | None = None) -> Weights:
        """Dequantize ``gguf``'s tensors into the forward pass's layout (seconds of CPU)."""
        if "output.weight" in gguf.tensors:
            raise ValueError("models with a separate output head are not supported (expected a tied embedding)")
        embedding = gguf.tensor("token_embd.weight")
        if embedding.shape != (cfg.vocab_size, cfg.dim):
            raise ValueError(f"token_embd has shape {embedding.shape}, expected {(cfg.vocab_size, cfg.dim)}")
        shapes = cls.shapes(cfg)
        w = cls(**{name: np.empty(shape, np.float32) for name, shape in shapes.items()})
        w.head[:] = to_panels(embedding)
        del embedding
        w.output_norm[:] = gguf.tensor("output_norm.weight")
        q_order = _halves_order(cfg.n_heads, cfg.head_dim)
        k_order = _halves_order(cfg.n_kv_heads, cfg.head_dim)
        for i in range(cfg.n_layers):
            t = {name: gguf.tensor(f"blk.{i}.{name}.weight") for name in LAYER_TENSORS}
            w.attn_norm[i] = t["attn_norm"]
            w.ffn_norm[i] = t["ffn_norm"]
            w.wqkv[i] = to_panels(np.concatenate([t["attn_q"][q_order], t["attn_k"][k_order], t["attn_v"]]))
            w.wo[i] = to_panels(t["attn_output"])
            w.wgu[i] = np.stack([to_panels(t["ffn_gate"]), to_panels(t["ffn_up"])], axis=1).reshape(w.wgu.shape[1:])
            w.wd[i] = to_panels(t["ffn_down"])
            if progress and (i + 1) % 10 == 0:
                progress(f"dequantized {i + 1}/{cfg.n_layers} layers")
        return w


@dataclass
class DenseWeights:
    """The weight matrices output-major (one contiguous row per output): the numpy
    passes' layout, unpacked from ``Weights``' panels at load (one more copy in memory,
    for the numpy passes only)."""

    head: np.ndarray  # (vocab, dim)
    wqkv: np.ndarray  # (layers, q + 2 kv, dim)
    wo: np.ndarray  # (layers, dim, q)
    wgu: np.ndarray  # (layers, 2 ffn, dim): gate then up
    wd: np.ndarray  # (layers, dim, ffn)

    @classmethod
    def unpack(cls, w: Weights, cfg: ModelConfig) -> DenseWeights:
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        pairs = w.wgu.reshape(cfg.n_layers, -1, 2, *w.wgu.shape[2:])
        gate_up = [from_panels(pairs[:, :, half], cfg.ffn_dim) for half in (0, 1)]
        return cls(
            head=from_panels(w.head, cfg.vocab_size),
            wqkv=from_panels(w.wqkv, q_dim + 2 * kv_dim),
            wo=from_panels(w.wo, cfg.dim),
            wgu=np.concatenate(gate_up, axis=1),
            wd=from_panels(w.wd, cfg.dim),
        )


class Model:
    """A loaded llama model with its KV cache; positions are passed explicitly."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Weights,
        context_length: int,
        prefill_chunk: int = 128,
        kernel: Kernel | None = None,
    ):
        """``kernel``: the C forward pass to use (None: the numpy reference passes)."""
        if prefill_chunk < 1 or context_length < 1:
            raise ValueError("context_length and prefill_chunk must be positive")
        self.config = cfg = config
        self.w = weights
        self.context_length = context_length
        self.prefill_chunk = prefill_chunk

        capacity = context_length
        self.keys = np.zeros((cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, capacity), dtype=np.float32)
        self.values = np.zeros((cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim), dtype=np.float32)
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) * 2 / cfg.head_dim)
        angles = np.arange(capacity, dtype=np.float64)[:, None] * inv_freq
        self.rope_cos = np.cos(angles).astype(np.float32)
        self.rope_sin = np.sin(angles).astype(np.float32)
        self._c_forward = kernel.bind(self, self._kernel_arrays()) if kernel else None
        self.dense = None if kernel else DenseWeights.unpack(weights, cfg)
        self._alloc_decode_buffers(capacity)

    @classmethod
    def from_gguf(
        cls, gguf: GGUFFile, context_length: int, prefill_chunk: int = 128, kernel: Kernel | None = None
    ) -> Model:
        """Dequantize and load ``gguf`` (for tools and tests; the backend caches the weights)."""
        config = ModelConfig.from_gguf_metadata(gguf.metadata)
        return cls(config, Weights.from_gguf(gguf, config), context_length, prefill_chunk, kernel)

    @property
    def uses_c(self) -> bool:
        """Whether the C forward pass runs (else numpy's reference passes)."""
        return self._c_forward is not None

    def _alloc_decode_buffers(self, capacity: int) -> None:
        cfg = self.config
        g = cfg.n_heads // cfg.n_kv_heads
        half = cfg.head_dim // 2
        f32 = np.float32
        self._x = np.empty(cfg.dim, f32)
        self._h = np.empty(cfg.dim, f32)
        self._qkv = np.empty((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, f32)
        self._rot = np.empty((cfg.n_heads + cfg.n_kv_heads, cfg.head_dim), f32)
        self._tmp = np.empty((cfg.n_heads + cfg.n_kv_heads, half), f32)
        self._scores = np.empty((cfg.n_kv_heads, g, capacity), f32)
        self._row = np.empty((cfg.n_kv_heads, g, 1), f32)
        self._attn = np.empty((cfg.n_kv_heads, g, cfg.head_dim), f32)
        self._proj = np.empty(cfg.dim, f32)
        self._gu = np.empty(2 * cfg.ffn_dim, f32)
        self._act = np.empty(cfg.ffn_dim, f32)
        self._logits = np.empty(cfg.vocab_size, f32)

    def _kernel_arrays(self) -> dict[str, np.ndarray]:
        """What the C forward pass reads and writes, by its struct's names (``kernels.ModelStruct``)."""
        return {**self.w.arrays(), "rope_cos": self.rope_cos, "rope_sin": self.rope_sin,
                "keys": self.keys, "values": self.values}

    # -- state -------------------------------------------------------------------------

    def save_state(self, n_tokens: int) -> KVState:
        """A copy of the KV cache of the first ``n_tokens`` positions."""
        return KVState(
            np.ascontiguousarray(self.keys[..., :n_tokens]), np.ascontiguousarray(self.values[:, :, :n_tokens])
        )

    def restore_state(self, state: KVState, n_tokens: int, start: int = 0) -> None:
        """Make positions ``[0, n_tokens)`` hold ``state``'s first ``n_tokens`` positions
        (copying from ``start`` on: the caller knows the positions before it agree)."""
        if n_tokens > state.n_tokens:
            raise ValueError(f"state holds {state.n_tokens} positions, not {n_tokens}")
        start = min(start, n_tokens)
        self.keys[..., start:n_tokens] = state.keys[..., start:n_tokens]
        self.values[:, :, start:n_tokens] = state.values[:, :, start:n_tokens]

    # -- prefill -----------------------------------------------------------------------

    def prefill(
        self, tokens: Sequence[int], start: int, on_chunk: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Run ``tokens`` at positions ``start...``; return the last position's logits (a new array).

        ``on_chunk`` is called after every chunk with how many of ``tokens`` are done
        (heartbeat, progress, cancellation: it may raise).
        """
        end = start + len(tokens)
        if not tokens or start < 0 or end > self.context_length:
            raise ValueError(f"cannot prefill {len(tokens)} tokens at position {start}")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"a token is outside the vocabulary of {self.config.vocab_size}")
        logits = np.empty(self.config.vocab_size, np.float32)
        for pos in range(start, end, self.prefill_chunk):
            chunk = ids[pos - start : pos - start + self.prefill_chunk]
            last = pos + len(chunk) == end
            if self._c_forward is not None:
                self._c_forward(chunk, pos, logits if last else None)
            else:
                hidden = self._prefill_numpy(chunk, pos)
                if last:
                    np.matmul(self.dense.head, self._rms_norm(hidden, self.w.output_norm), out=logits)
            if on_chunk:
                on_chunk(pos + len(chunk) - start)
        return logits

    def _prefill_numpy(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Run one chunk in numpy (the reference); return its last hidden state."""
        cfg = self.config
        T = len(ids)
        g = cfg.n_heads // cfg.n_kv_heads
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        half = hd // 2
        q_dim = nh * hd
        n_keys = start + T
        mask = np.where(np.arange(n_keys) <= np.arange(start, n_keys)[:, None], 0.0, -np.inf).astype(np.float32)
        cos = self.rope_cos[start:n_keys, None, :]
        sin = self.rope_sin[start:n_keys, None, :]

        x = self.dense.head[ids]
        with np.errstate(over="ignore"):
            for layer in range(cfg.n_layers):
                h = self._rms_norm(x, self.w.attn_norm[layer])
                qkv = h @ self.dense.wqkv[layer].T
                qk = qkv[:, : q_dim + nkv * hd].reshape(T, nh + nkv, hd)
                first, second = qk[..., :half], qk[..., half:]
                rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
                keys, values = self.keys[layer], self.values[layer]
                keys[:, :, start:n_keys] = rotated[:, nh:].transpose(1, 2, 0)
                values[:, start:n_keys] = qkv[:, q_dim + nkv * hd :].reshape(T, nkv, hd).transpose(1, 0, 2)
                # Query heads grouped under their shared KV head: (kv_head, group * T, dim).
                queries = rotated[:, :nh] * np.float32(hd**-0.5)
                queries = queries.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * T, hd)
                scores = queries @ keys[:, :, :n_keys]
                scores = scores.reshape(nkv, g, T, n_keys)
                scores += mask
                totals = self._exp_scores(scores)
                attended = scores.reshape(nkv, g * T, n_keys) @ values[:, :n_keys]
                attended /= totals.reshape(nkv, g * T, 1)
                attended = attended.reshape(nkv, g, T, hd).transpose(2, 0, 1, 3).reshape(T, q_dim)
                x += attended @ self.dense.wo[layer].T
                h = self._rms_norm(x, self.w.ffn_norm[layer])
                gate_up = h @ self.dense.wgu[layer].T
                gate, up = gate_up[:, : cfg.ffn_dim], gate_up[:, cfg.ffn_dim :]
                x += (gate / (1.0 + np.exp(-gate)) * up) @ self.dense.wd[layer].T
        return x[-1]

    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        mean_square = np.square(x).sum(axis=-1, keepdims=True) / np.float32(self.config.dim)
        out = x * (np.float32(1.0) / np.sqrt(mean_square + np.float32(self.config.norm_eps)))
        out *= weight
        return out

    @staticmethod
    def _exp_scores(scores: np.ndarray, row_buffer: np.ndarray | None = None) -> np.ndarray:
        """Softmax numerators in place; returns the row sums (in ``row_buffer`` if given).

        Dividing the attention output by the sums, instead of the weights, saves a pass
        over the (heads x rows x keys) scores.
        """
        row = np.max(scores, axis=-1, keepdims=True, out=row_buffer)
        scores -= row
        np.exp(scores, out=scores)
        return np.sum(scores, axis=-1, keepdims=True, out=row)

    # -- decode ------------------------------------------------------------------------

    def decode(self, token: int, pos: int) -> np.ndarray:
        """Run one token at ``pos``; return its logits (a buffer reused by the next call)."""
        if not 0 <= pos < self.context_length:
            raise ValueError(f"position {pos} is outside the context of {self.context_length}")
        if not 0 <= token < self.config.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary of {self.config.vocab_size}")
        if self._c_forward is not None:
            self._c_forward(np.array([token], np.int64), pos, self._logits)
        else:
            self._decode_numpy(token, pos)
        return self._logits

    def _decode_numpy(self, token: int, pos: int) -> None:
        """The decode step in numpy: the reference ``forward.c`` computes faster."""
        cfg = self.config
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        half = hd // 2
        q_dim, kv_dim = nh * hd, nkv * hd
        n_keys = pos + 1
        x, h, qkv, rot, tmp = self._x, self._h, self._qkv, self._rot, self._tmp
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        qk = qkv[: q_dim + kv_dim].reshape(nh + nkv, hd)
        first, second = qk[:, :half], qk[:, half:]
        scores = self._scores[:, :, :n_keys]
        attended = self._attn
        queries = rot[:nh].reshape(nkv, nh // nkv, hd)
        scale = np.float32(hd**-0.5)

        x[:] = self.dense.head[token]
        with np.errstate(over="ignore"):
            for layer in range(cfg.n_layers):
                self._rms_norm_into(x, self.w.attn_norm[layer], h)
                np.matmul(self.dense.wqkv[layer], h, out=qkv)
                np.multiply(first, cos, out=rot[:, :half])
                np.multiply(second, sin, out=tmp)
                rot[:, :half] -= tmp
                np.multiply(second, cos, out=rot[:, half:])
                np.multiply(first, sin, out=tmp)
                rot[:, half:] += tmp
                keys, values = self.keys[layer], self.values[layer]
                keys[:, :, pos] = rot[nh:]
                values[:, pos] = qkv[q_dim + kv_dim :].reshape(nkv, hd)
                rot[:nh] *= scale
                np.matmul(queries, keys[:, :, :n_keys], out=scores)
                totals = self._exp_scores(scores, self._row)
                np.matmul(scores, values[:, :n_keys], out=attended)
                attended /= totals
                np.matmul(self.dense.wo[layer], attended.reshape(q_dim), out=self._proj)
                x += self._proj
                self._rms_norm_into(x, self.w.ffn_norm[layer], h)
                np.matmul(self.dense.wgu[layer], h, out=self._gu)
                gate, up = self._gu[: cfg.ffn_dim], self._gu[cfg.ffn_dim :]
                act = self._act
                np.negative(gate, out=act)
                np.exp(act, out=act)
                act += 1.0
                np.divide(gate, act, out=act)
                act *= up
                np.matmul(self.dense.wd[layer], act, out=self._proj)
                x += self._proj
        self._rms_norm_into(x, self.w.output_norm, h)
        np.matmul(self.dense.head, h, out=self._logits)

    def _rms_norm_into(self, x: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        scale = np.float32(1.0) / np.sqrt(np.dot(x, x) / np.float32(self.config.dim) + np.float32(self.config.norm_eps))
        np.multiply(x, scale, out=out)
        out *= weight
