"""The llama transformer forward pass in float32 numpy: the reference for ``forward.c``.

Weights (``Weights``) are dequantized once, then kept on disk between starts
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

Each stream has its own KV cache (a ``KVSlot``), allocated for the whole context in blocks
of positions (forward.c's attention chunks), each block holding every layer's keys as
``[kv_head, dim, position]`` (so query-key products read contiguous rows, several times
faster than a transposed view in decode) and values as ``[kv_head, position, dim]``:
attention reads a chunk's keys and values from two contiguous stretches, and a slot's
memory is mapped block by block as its positions are written (a 4,096-token slot of
SmolLM2 is 189 MB of address space; its first position maps 12 MB). Prefix states
(``KVState``) keep the plain ``[layer, kv_head, ...]`` layout of their positions alone.

``step`` runs several streams' rows in one pass over the weights: a chunk of one
stream's prompt, one decode row of each of several streams, or both. Prefill runs in
chunks of ``prefill_chunk`` tokens (heartbeats, cancellation and other streams' steps come
between them). With the C forward pass every position's result is bitwise independent
of how the prompt was split, of whether it was prefilled or decoded, and of the other
streams' rows in the same step (see ``forward.c``). The numpy passes batch nothing: they
run each stream's rows of a step in turn. They (``_prefill_numpy``, ``_decode_numpy``) compute the
same thing through BLAS, whose sums run in another order and whose result for a row may
depend on the rows around it: they agree with the C pass to float32 rounding, not bit
for bit (tests/test_decode_kernel.py compares them so; tests/test_exactness.py checks
the C pass's bits across splits, builds and thread counts).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architecture import ModelConfig
from .gguf import GGUFFile
from .kernels import PANEL, Kernel

log = logging.getLogger(__name__)

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


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

    Made by ``from_gguf`` (dequantizing) or read or mapped from a file by ``weights_file``;
    the forward pass never writes to them, so read-only arrays and maps serve.
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


#: Positions per block of a KV slot in the numpy passes (the C pass's is its own, ``BoundForward.kv_block``).
KV_BLOCK = 256


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """Zeroed float32 memory mapped as it is written, in 2 MB pages where the kernel
    allows: a slot's positions stay within their block (see ``KVSlot``), so its memory
    grows block by block, and attention reads keys and values without a TLB miss every
    4 KB (forward.c's ``kv_block_offset`` has the timings)."""
    region = mmap.mmap(-1, max(1, int(np.prod(shape))) * 4, flags=mmap.MAP_PRIVATE)  # shared memory gets no huge pages
    with contextlib.suppress(AttributeError, OSError):  # a kernel without huge pages refuses the advice
        region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, np.float32, count=int(np.prod(shape))).reshape(shape)


@dataclass(eq=False)
class KVSlot:
    """One stream's KV cache for the whole context, and the tokens whose keys and values it
    holds at positions 0... (restoring a state that agrees with them copies only where
    they differ; a conversation state is copied from them).

    Blocks of positions (see the module docstring): position p's are in block p // B at
    p % B, B the last axis of ``keys``. ``read`` and ``write`` see them in the plain
    ``[..., kv_head, dim, position]`` and ``[..., kv_head, position, dim]`` layouts."""

    keys: np.ndarray  # [block, layer, kv_head, dim, B]
    values: np.ndarray  # [block, layer, kv_head, B, dim]
    live: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    addresses: tuple[int, int] = (0, 0)  # keys' and values' for the C forward pass

    def _blocks(self, start: int, end: int) -> list[tuple[int, slice, slice]]:
        """The blocks that positions [start, end) cross: (block, within it, within [start, end))."""
        size = self.keys.shape[-1]
        return [(b, slice(max(start, b * size) - b * size, min(end, b * size + size) - b * size),
                 slice(max(start, b * size) - start, min(end, b * size + size) - start))
                for b in range(start // size, -(-end // size))]

    def read(self, start: int, end: int, layer: int | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Copies of positions [start, end)'s keys and values of ``layer`` (an index: one
        layer, dims [kv_head, ...]; a slice: [layer, kv_head, ...])."""
        blocks = self._blocks(start, end)
        if not blocks:
            *lead, dim = self.keys.shape[2:-1] if isinstance(layer, int) else self.keys.shape[1:-1]
            return np.empty((*lead, dim, 0), np.float32), np.empty((*lead, 0, dim), np.float32)
        keys = np.concatenate([self.keys[b, layer][..., inside] for b, inside, _ in blocks], axis=-1)
        values = np.concatenate([self.values[b, layer][..., inside, :] for b, inside, _ in blocks], axis=-2)
        return keys, values

    def write(self, start: int, keys: np.ndarray, values: np.ndarray, layer: int | slice = slice(None)) -> None:
        """Make positions ``start...`` of ``layer`` hold ``keys`` and ``values`` (laid out as ``read`` gives them)."""
        for b, inside, given in self._blocks(start, start + keys.shape[-1]):
            self.keys[b, layer][..., inside] = keys[..., given]
            self.values[b, layer][..., inside, :] = values[..., given, :]


@dataclass(frozen=True)
class Rows:
    """Tokens of one stream at positions ``start...`` of its slot, for one ``Model.step``;
    ``logits``: whether the last one's logits are wanted."""

    slot: KVSlot
    tokens: Sequence[int]
    start: int
    logits: bool = True


class Model:
    """A loaded llama model; its KV caches are slots (``new_slot``), positions explicit."""

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
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) * 2 / cfg.head_dim)
        angles = np.arange(capacity, dtype=np.float64)[:, None] * inv_freq
        self.rope_cos = np.cos(angles).astype(np.float32)
        self.rope_sin = np.sin(angles).astype(np.float32)
        self._c_forward = kernel.bind(self.config, self.context_length, self._kernel_arrays()) if kernel else None
        self.kv_block = self._c_forward.kv_block if self._c_forward else KV_BLOCK
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
        """What the C forward pass reads, by its struct's names (``kernels.ModelStruct``)."""
        return {**self.w.arrays(), "rope_cos": self.rope_cos, "rope_sin": self.rope_sin}

    # -- state -------------------------------------------------------------------------

    def new_slot(self) -> KVSlot:
        """A KV cache for one stream, in memory mapped only as its positions are written."""
        cfg, size = self.config, self.kv_block
        blocks = -(-self.context_length // size)
        keys = _lazy_zeros((blocks, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, size))
        values = _lazy_zeros((blocks, cfg.n_layers, cfg.n_kv_heads, size, cfg.head_dim))
        slot = KVSlot(keys, values)
        if self._c_forward is not None:
            slot.addresses = (self._c_forward.cache_address(keys), self._c_forward.cache_address(values))
        return slot

    @staticmethod
    def save_state(slot: KVSlot, n_tokens: int) -> KVState:
        """A copy of ``slot``'s first ``n_tokens`` positions."""
        return KVState(*slot.read(0, n_tokens))

    @staticmethod
    def restore_state(slot: KVSlot, state: KVState, n_tokens: int, start: int = 0) -> None:
        """Make ``slot``'s positions ``[0, n_tokens)`` hold ``state``'s first ``n_tokens``
        (copying from ``start`` on: the caller knows the positions before it agree)."""
        if n_tokens > state.n_tokens:
            raise ValueError(f"state holds {state.n_tokens} positions, not {n_tokens}")
        layers, kv_heads, dim = slot.keys.shape[1:4]
        if state.keys.shape[:3] != (layers, kv_heads, dim) or state.values.shape[:2] + state.values.shape[3:] != (layers, kv_heads, dim):
            raise ValueError(f"state is not of this model's layers, KV heads and head dimension ({layers}, {kv_heads}, {dim})")
        start = min(start, n_tokens)
        if start < n_tokens:
            slot.write(start, state.keys[..., start:n_tokens], state.values[:, :, start:n_tokens])

    # -- forward -----------------------------------------------------------------------

    def step(self, parts: Sequence[Rows]) -> np.ndarray:
        """Run every part's tokens in one pass over the weights (C; numpy runs them in turn);
        return the logits wanted, one row per part that wants them, in order (a new array).
        No two parts may write one position of one slot."""
        rows = self._checked_rows(parts)
        logits = np.empty((sum(part.logits for part in parts), self.config.vocab_size), np.float32)
        if self._c_forward is None:
            wanted = iter(logits)
            for part in parts:
                tokens = np.asarray(part.tokens, dtype=np.int64)
                self._run_numpy(part.slot, tokens, part.start, next(wanted) if part.logits else None)
            return logits
        ends, logit_rows = 0, []
        for part in parts:
            ends += len(part.tokens)
            if part.logits:
                logit_rows.append(ends - 1)
        self._c_forward(rows, np.array(logit_rows, np.int64), logits)
        return logits

    def _checked_rows(self, parts: Sequence[Rows]) -> np.ndarray:
        """The parts' rows for the C forward pass, one column each: token, position, the
        addresses of its slot's keys and values (int64, [4, rows]). Built with few numpy
        calls: between two decode steps the interpreter runs from memory (a step's 538 MB
        of weights have passed through every cache), and the step's arrays took 100 us of
        the daemon's 400 us between steps in fifteen numpy calls."""
        vocab, rows = self.config.vocab_size, []
        for part in parts:
            n = len(part.tokens)
            if not n or part.start < 0 or part.start + n > self.context_length:
                raise ValueError(f"cannot run {n} tokens at position {part.start}")
            keys, values = part.slot.addresses if self._c_forward is not None else (0, 0)
            for position, token in enumerate(part.tokens, part.start):
                if not 0 <= token < vocab:
                    raise ValueError(f"a token is outside the vocabulary of {vocab}")
                rows.append((token, position, keys, values))
        return np.array(rows, np.int64).T.copy()

    def _run_numpy(self, slot: KVSlot, tokens: np.ndarray, start: int, logits: np.ndarray | None) -> None:
        """One stream's rows in numpy: one token whose logits are wanted is a decode step,
        anything else a prefill chunk."""
        if len(tokens) == 1 and logits is not None:
            self._decode_numpy(slot, int(tokens[0]), start)
            logits[:] = self._logits
            return
        hidden = self._prefill_numpy(slot, tokens, start)
        if logits is not None:
            np.matmul(self.dense.head, self._rms_norm(hidden[-1], self.w.output_norm), out=logits)

    def hidden_states(self, parts: Sequence[Rows]) -> list[np.ndarray]:
        """Run every part's tokens as ``step`` does, and return each part's final hidden states
        after the output norm ([tokens, dim] float32, new arrays): what embeddings pool, no lm_head."""
        rows = self._checked_rows(parts)
        if self._c_forward is None:
            return [self._rms_norm(self._prefill_numpy(part.slot, np.asarray(part.tokens, dtype=np.int64), part.start),
                                   self.w.output_norm) for part in parts]
        hidden = np.empty((rows.shape[1], self.config.dim), np.float32)
        self._c_forward.hidden(rows, hidden)
        return np.split(hidden, np.cumsum([len(part.tokens) for part in parts])[:-1])

    def prefill(
        self, slot: KVSlot, tokens: Sequence[int], start: int, on_chunk: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Run ``tokens`` at positions ``start...`` of ``slot``, by chunks of ``prefill_chunk``;
        return the last position's logits (a new array).

        ``on_chunk`` is called after every chunk with how many of ``tokens`` are done
        (heartbeat, progress, cancellation: it may raise).
        """
        if not len(tokens):
            raise ValueError(f"cannot prefill no tokens at position {start}")
        end = start + len(tokens)
        for pos in range(start, end, self.prefill_chunk):
            chunk = tokens[pos - start : pos - start + self.prefill_chunk]
            logits = self.step([Rows(slot, chunk, pos, logits=pos + len(chunk) == end)])
            if on_chunk:
                on_chunk(pos + len(chunk) - start)
        return logits[0]

    def decode(self, slot: KVSlot, token: int, pos: int) -> np.ndarray:
        """Run one token at ``pos`` of ``slot``; return its logits (a new array)."""
        return self.step([Rows(slot, [token], pos)])[0]

    def _prefill_numpy(self, slot: KVSlot, ids: np.ndarray, start: int) -> np.ndarray:
        """Run one chunk in numpy (the reference); return its hidden states (before the output norm)."""
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
                slot.write(start, rotated[:, nh:].transpose(1, 2, 0),
                           qkv[:, q_dim + nkv * hd :].reshape(T, nkv, hd).transpose(1, 0, 2), layer)
                keys, values = slot.read(0, n_keys, layer)
                # Query heads grouped under their shared KV head: (kv_head, group * T, dim).
                queries = rotated[:, :nh] * np.float32(hd**-0.5)
                queries = queries.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * T, hd)
                scores = queries @ keys
                scores = scores.reshape(nkv, g, T, n_keys)
                scores += mask
                totals = self._exp_scores(scores)
                attended = scores.reshape(nkv, g * T, n_keys) @ values
                attended /= totals.reshape(nkv, g * T, 1)
                attended = attended.reshape(nkv, g, T, hd).transpose(2, 0, 1, 3).reshape(T, q_dim)
                x += attended @ self.dense.wo[layer].T
                h = self._rms_norm(x, self.w.ffn_norm[layer])
                gate_up = h @ self.dense.wgu[layer].T
                gate, up = gate_up[:, : cfg.ffn_dim], gate_up[:, cfg.ffn_dim :]
                x += (gate / (1.0 + np.exp(-gate)) * up) @ self.dense.wd[layer].T
        return x

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

    def _decode_numpy(self, slot: KVSlot, token: int, pos: int) -> None:
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
                slot.write(pos, rot[nh:, :, None], qkv[q_dim + kv_dim :].reshape(nkv, 1, hd), layer)
                keys, values = slot.read(0, n_keys, layer)
                rot[:nh] *= scale
                np.matmul(queries, keys, out=scores)
                totals = self._exp_scores(scores, self._row)
                np.matmul(scores, values, out=attended)
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
